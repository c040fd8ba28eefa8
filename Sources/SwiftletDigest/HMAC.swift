/// HMAC-SHA256 (RFC 2104 with SHA-256, as in FIPS 198-1) over Swiftlet's own `SHA256`.
public enum HMACSHA256 {
    /// SHA-256's block size: longer keys are hashed first, shorter ones padded with zeros.
    static let blockSize = 64

    /// The 32-byte authentication code of `message` under `key`.
    public static func authenticationCode(of message: [UInt8], key: [UInt8]) -> [UInt8] {
        var code = Code(key: key)
        code.update(message)
        return code.finalize()
    }

    /// An authentication code computed piece by piece (for a message that is not in one array).
    public struct Code: Sendable {
        private var inner = SHA256()
        private let outerBlock: [UInt8]

        public init(key: [UInt8]) {
            var block = key.count > HMACSHA256.blockSize ? SHA256.hash(key) : key
            block += [UInt8](repeating: 0, count: HMACSHA256.blockSize - block.count)
            inner.update(block.map { $0 ^ 0x36 })
            outerBlock = block.map { $0 ^ 0x5c }
        }

        public mutating func update(_ bytes: [UInt8]) { inner.update(bytes) }
        public mutating func update(_ buffer: UnsafeRawBufferPointer) { inner.update(buffer) }

        /// The 32-byte code of everything given to `update`.
        public mutating func finalize() -> [UInt8] {
            var outer = SHA256()
            outer.update(outerBlock)
            outer.update(inner.finalize())
            return outer.finalize()
        }
    }

    /// Whether `a` and `b` are equal, in a time that does not depend on where they first differ
    /// (for comparing a code someone sent with the expected one).
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in a.indices { difference |= a[i] ^ b[i] }
        return difference == 0
    }
}
