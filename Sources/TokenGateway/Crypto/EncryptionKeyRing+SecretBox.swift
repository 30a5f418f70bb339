import FlowEngine

extension EncryptionKeyRing: SecretBox {}
