// ``Base64URL`` lives in its own small target so the emulator can share it without depending on the
// gateway; users of the gateway get it with `import TokenGateway`.
@_exported import Base64URLCoding
