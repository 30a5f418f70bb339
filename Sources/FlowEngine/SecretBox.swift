/// Encrypts secrets at rest. The gateway's implementation is an AES-GCM key ring; `context`
/// (the Redis key name, plus `#field` for a hash field) is bound as additional authenticated
/// data so a blob copied under another key fails to open.
public protocol SecretBox: Sendable {
    /// Seals `plaintext`; the result is ASCII and reveals nothing of the plaintext.
    func seal(_ plaintext: [UInt8], context: String) throws -> String
    /// Opens a sealed blob; throws when the key is unknown, the blob is corrupt or the context differs.
    func open(_ sealed: String, context: String) throws -> [UInt8]
    /// Seals so that equal plaintexts under one context give equal blobs (see the extension).
    func sealDeterministically(_ plaintext: [UInt8], context: String) throws -> String
    /// What ``sealDeterministically(_:context:)`` gives under each key that could have sealed it
    /// (the sealing key first): a value compared in place that was written before a key rotation
    /// still matches one of them.
    func sealDeterministicallyUnderEveryKey(_ plaintext: [UInt8], context: String) throws -> [String]
}

extension SecretBox {
    /// Seals `plaintext` so that the same plaintext under the same context and key gives the same
    /// blob (for values compared in place, such as routing data; it reveals only equality). By
    /// default the same as ``seal(_:context:)``.
    public func sealDeterministically(_ plaintext: [UInt8], context: String) throws -> String {
        try self.seal(plaintext, context: context)
    }

    /// By default the one blob of ``sealDeterministically(_:context:)``.
    public func sealDeterministicallyUnderEveryKey(_ plaintext: [UInt8], context: String) throws -> [String] {
        [try self.sealDeterministically(plaintext, context: context)]
    }
}
