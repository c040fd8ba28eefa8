import SwiftletSystem

/// A content digest, `sha256:` and 64 lowercase hex digits: the address of every blob in the store.
public struct Digest: Hashable, Sendable, Codable, CustomStringConvertible, Comparable {
    /// The 64 hex digits.
    public let hex: String

    public init(parsing text: String) throws(SwiftletError) {
        guard text.hasPrefix("sha256:") else {
            throw SwiftletError(.unsupported, "unsupported digest \(text.debugDescription): Swiftlet handles sha256 digests only")
        }
        let hex = String(text.dropFirst(7))
        guard hex.utf8.count == 64, hex.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
            throw SwiftletError(.invalidFormat, "malformed digest \(text.debugDescription): expected sha256: and 64 lowercase hex digits")
        }
        self.hex = hex
    }

    public init(bytes: [UInt8]) {
        let digits = Array("0123456789abcdef".utf8)
        var text = [UInt8]()
        text.reserveCapacity(64)
        for byte in bytes { text.append(digits[Int(byte >> 4)]); text.append(digits[Int(byte & 15)]) }
        self.hex = String(decoding: text, as: UTF8.self)
    }

    /// The digest of `bytes`.
    public static func of(_ bytes: [UInt8]) -> Digest { Digest(bytes: SHA256.hash(bytes)) }

    public var description: String { "sha256:" + hex }
    /// The first 12 hex digits, as `docker images` shows them.
    public var short: String { String(hex.prefix(12)) }

    public static func < (lhs: Digest, rhs: Digest) -> Bool { lhs.hex < rhs.hex }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { try self.init(parsing: text) } catch { throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description)) }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
