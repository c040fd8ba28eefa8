import SwiftletSystem

/// An Ethernet (IEEE 802) MAC address: six bytes, printed and parsed as `02:53:57:00:00:01`
/// (lowercase hex when printed; either case when parsed). Codable as that string.
public struct MACAddress: Hashable, Sendable, Codable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// The address made of exactly six bytes; nil for any other count.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses six two-digit hex groups separated by colons.
    public init(parsing text: String) throws(SwiftletError) {
        let groups = text.split(separator: ":", omittingEmptySubsequences: false)
        guard groups.count == 6 else {
            throw SwiftletError(.invalidArgument, "\"\(text)\" is not a MAC address (six hex pairs separated by colons, e.g. 02:53:57:00:00:01)")
        }
        var bytes: [UInt8] = []
        for group in groups {
            guard group.utf8.count == 2, let byte = UInt8(group, radix: 16) else {
                throw SwiftletError(.invalidArgument, "\"\(text)\" is not a MAC address: \"\(group)\" is not two hex digits")
            }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try MACAddress(parsing: text) } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.message))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
