import SwiftletDigest

/// How the agent shows the host that a connection is its own and not another guest process's
/// (docs/agent-protocol.md, "Authentication"): it holds the machine's agent key, a secret the host
/// gave it on the machine's first session, and answers each session's random challenge with an
/// HMAC-SHA256 of it under that key.
public enum AgentAuthentication {
    public static let keyLength = 32
    public static let nonceLength = 32
    /// Put before the nonce, so a proof is good for this protocol and nothing else.
    static let label = Array("swiftlet agent proof".utf8)

    /// The answer to `challenge(nonce)` from an agent that holds `key`.
    public static func proof(key: [UInt8], nonce: [UInt8]) -> [UInt8] {
        HMACSHA256.authenticationCode(of: label + nonce, key: key)
    }

    /// Whether `proof` answers `nonce` under `key`.
    public static func verify(_ proof: [UInt8], key: [UInt8], nonce: [UInt8]) -> Bool {
        HMACSHA256.constantTimeEqual(proof, self.proof(key: key, nonce: nonce))
    }
}
