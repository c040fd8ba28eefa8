import SwiftletSystem

/// An Ethernet (MAC-48) address, printed and parsed as `02:53:57:00:00:01`. Codable as that string.
public struct MACAddress: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The six bytes, first on the wire first.
    public let bytes: [UInt8]

    /// `bytes` must hold six bytes; other counts are an error.
    public init(_ bytes: [UInt8]) throws(SwiftletError) {
        guard bytes.count == 6 else {
            throw SwiftletError(.invalidArgument, "a MAC address has 6 bytes, not \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// Parses six two-digit hex bytes separated by colons, e.g. `02:53:57:00:00:01`.
    public init(parsing text: String) throws(SwiftletError) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        guard parts.count == 6, bytes.count == 6 else {
            throw SwiftletError(.invalidArgument, "'\(text)' is not a MAC address (six hex bytes like 02:53:57:00:00:01)")
        }
        self.bytes = bytes
    }

    /// Reads six bytes at `offset` (the caller checked the bounds).
    init(_ buffer: UnsafeRawBufferPointer, at offset: Int) {
        bytes = Array(buffer[offset..<offset + 6])
    }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        self = try Self(parsing: text)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An IPv4 or IPv6 address. A plain value (no storage to allocate), so the filter looks it up in
/// its tables at no cost. Parsed from and printed as the usual text (IPv6 per RFC 5952: lowercase,
/// the longest run of two or more zero groups as `::`). Codable as that text.
public enum IPAddress: Hashable, Sendable, Codable, CustomStringConvertible {
    /// An IPv4 address, most significant byte first on the wire (10.0.2.15 is 0x0A00_020F).
    case v4(UInt32)
    /// An IPv6 address as its high and low 64 bits.
    case v6(UInt64, UInt64)

    /// Parses `10.0.2.15`, `::1`, `2001:db8::1`, `::ffff:192.0.2.1`. No zone (`%eth0`), no brackets.
    public init(parsing text: String) throws(SwiftletError) {
        if let v4 = Self.parseV4(Substring(text)) {
            self = .v4(v4)
        } else if text.contains(":"), let v6 = Self.parseV6(text) {
            self = .v6(v6.0, v6.1)
        } else {
            throw SwiftletError(.invalidArgument,
                                "'\(text)' is not an IP address (IPv4 like 192.0.2.1, or IPv6 like 2001:db8::1)")
        }
    }

    /// The address from its 4 or 16 bytes in network order; nil for other counts.
    public init?(bytes: [UInt8]) {
        switch bytes.count {
        case 4: self = .v4(bytes.reduce(0) { $0 << 8 | UInt32($1) })
        case 16:
            self = .v6(bytes[0..<8].reduce(0) { $0 << 8 | UInt64($1) }, bytes[8..<16].reduce(0) { $0 << 8 | UInt64($1) })
        default: return nil
        }
    }

    /// The address's bytes in network order (4 or 16).
    public var bytes: [UInt8] {
        switch self {
        case .v4(let a): return (0..<4).map { UInt8(truncatingIfNeeded: a >> (24 - 8 * $0)) }
        case .v6(let h, let l): return (0..<16).map { UInt8(truncatingIfNeeded: ($0 < 8 ? h : l) >> (56 - 8 * ($0 % 8))) }
        }
    }

    public var isV4: Bool { if case .v4 = self { true } else { false } }

    public var description: String {
        switch self {
        case .v4(let a): return (0..<4).map { String(UInt8(truncatingIfNeeded: a >> (24 - 8 * $0))) }.joined(separator: ".")
        case .v6(let h, let l):
            let groups = (0..<8).map { UInt16(truncatingIfNeeded: ($0 < 4 ? h : l) >> (48 - 16 * ($0 % 4))) }
            // The longest run of at least two zero groups (the first of equal runs) becomes `::`.
            var best = (start: -1, length: 0), current = (start: -1, length: 0)
            for (i, group) in groups.enumerated() {
                if group == 0 {
                    current = current.start < 0 ? (i, 1) : (current.start, current.length + 1)
                    if current.length > best.length { best = current }
                } else {
                    current = (-1, 0)
                }
            }
            let hex = groups.map { String($0, radix: 16) }
            guard best.length >= 2 else { return hex.joined(separator: ":") }
            return hex[0..<best.start].joined(separator: ":") + "::"
                + hex[(best.start + best.length)...].joined(separator: ":")
        }
    }

    public init(from decoder: any Decoder) throws {
        self = try Self(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    /// Dotted quad: four decimal numbers 0–255, no leading zeros (which some tools read as octal).
    static func parseV4(_ text: Substring) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard (1...3).contains(part.count), part.allSatisfy({ $0.isASCII && $0.isNumber }),
                  part.count == 1 || part.first != "0", let byte = UInt8(part) else { return nil }
            value = value << 8 | UInt32(byte)
        }
        return value
    }

    /// Up to eight hex groups of 1–4 digits, at most one `::`, optionally ending in a dotted quad.
    static func parseV6(_ text: String) -> (UInt64, UInt64)? {
        guard text.count <= 45 else { return nil }
        // Split at the one `::` (if any): a second one, or `:::`, is malformed.
        var halves = [text]
        if let gap = text.firstRange(of: "::") {
            let tail = String(text[gap.upperBound...])
            guard !tail.contains("::"), !tail.hasPrefix(":") else { return nil }
            halves = [String(text[..<gap.lowerBound]), tail]
        }
        // A dotted quad may only end the address: the last field of the last part.
        func groups(_ part: String, quadAllowed: Bool) -> [UInt16]? {
            if part.isEmpty { return [] }
            var result: [UInt16] = []
            let fields = part.split(separator: ":", omittingEmptySubsequences: false)
            for (i, field) in fields.enumerated() {
                if quadAllowed, i == fields.count - 1, field.contains("."), let v4 = parseV4(field) {
                    result += [UInt16(v4 >> 16), UInt16(truncatingIfNeeded: v4)]
                } else {
                    guard (1...4).contains(field.count), field.allSatisfy(\.isHexDigit), let group = UInt16(field, radix: 16) else { return nil }
                    result.append(group)
                }
            }
            return result
        }
        guard let head = groups(halves[0], quadAllowed: halves.count == 1) else { return nil }
        var all = head
        if halves.count == 2 {
            guard let tail = groups(halves[1], quadAllowed: true), head.count + tail.count <= 7 else { return nil }
            all += [UInt16](repeating: 0, count: 8 - head.count - tail.count) + tail
        }
        guard all.count == 8 else { return nil }
        let high = all[0..<4].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        let low = all[4..<8].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        return (high, low)
    }
}

/// An address range: an address and a prefix length (`10.0.0.0/8`, `2001:db8::/32`). A bare
/// address means that one address (`/32` or `/128`). An address with bits set past the prefix
/// (`10.0.0.1/8`) is an error that names the range it probably meant: the filter never guesses.
public struct CIDR: Hashable, Sendable, Codable, CustomStringConvertible {
    public let address: IPAddress
    public let prefixLength: Int

    public init(parsing text: String) throws(SwiftletError) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = try? IPAddress(parsing: String(parts[0])) else {
            throw SwiftletError(.invalidArgument,
                                "'\(text)' is not an address range (like 192.0.2.0/24 or 2001:db8::/32)")
        }
        let maximum = address.isV4 ? 32 : 128
        var length = maximum
        if parts.count == 2 {
            guard parts[1].count <= 3, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
                  let parsed = Int(parts[1]), parsed <= maximum else {
                throw SwiftletError(.invalidArgument,
                                    "'\(text)': the prefix length after '/' must be a number from 0 to \(maximum)")
            }
            length = parsed
        }
        let network = Self.masked(address, length)
        guard network == address else {
            throw SwiftletError(.invalidArgument,
                                "'\(text)' has bits set past its /\(length) prefix: did you mean \(network)/\(length)?")
        }
        self.address = address
        self.prefixLength = length
    }

    /// A range from a network address and a prefix length; the bits past the prefix are cleared.
    public init(_ address: IPAddress, prefixLength: Int) {
        let length = max(0, min(prefixLength, address.isV4 ? 32 : 128))
        self.address = Self.masked(address, length)
        self.prefixLength = length
    }

    /// Whether `candidate` is in the range (never across families).
    public func contains(_ candidate: IPAddress) -> Bool {
        switch (address, candidate) {
        case (.v4, .v4), (.v6, .v6): return Self.masked(candidate, prefixLength) == address
        default: return false
        }
    }

    public var description: String { "\(address)/\(prefixLength)" }

    public init(from decoder: any Decoder) throws {
        self = try Self(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    static func masked(_ address: IPAddress, _ length: Int) -> IPAddress {
        func mask64(_ bits: Int) -> UInt64 { bits <= 0 ? 0 : bits >= 64 ? ~0 : ~(UInt64.max >> UInt64(bits)) }
        switch address {
        case .v4(let a): return .v4(length <= 0 ? 0 : a & ~(UInt32.max >> UInt32(min(length, 32)) ))
        case .v6(let h, let l): return .v6(h & mask64(length), l & mask64(length - 64))
        }
    }
}
