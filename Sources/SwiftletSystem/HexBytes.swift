/// Bytes that Codable formats store as one lowercase hexadecimal string instead of an array of
/// numbers. Snapshot state holds kilobytes of KVM structs (XSAVE area, local APIC page, interrupt
/// controllers); as JSON number arrays they were most of the state file and most of the time a
/// restore spent reading it.
@propertyWrapper
public struct HexBytes: Codable, Sendable, Equatable, Hashable {
    public var wrappedValue: [UInt8]

    public init(wrappedValue: [UInt8]) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        wrappedValue = try Hex.decode(decoder.singleValueContainer().decode(String.self), codingPath: decoder.codingPath)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(Hex.encode(wrappedValue))
    }
}

/// `HexBytes` for an optional value; nil is stored as null.
@propertyWrapper
public struct OptionalHexBytes: Codable, Sendable, Equatable, Hashable {
    public var wrappedValue: [UInt8]?

    public init(wrappedValue: [UInt8]?) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        wrappedValue = container.decodeNil() ? nil : try Hex.decode(container.decode(String.self), codingPath: decoder.codingPath)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let wrappedValue { try container.encode(Hex.encode(wrappedValue)) } else { try container.encodeNil() }
    }
}

/// `HexBytes` for a list of byte strings: an array of hexadecimal strings.
@propertyWrapper
public struct HexByteList: Codable, Sendable, Equatable, Hashable {
    public var wrappedValue: [[UInt8]]

    public init(wrappedValue: [[UInt8]]) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        let strings = try decoder.singleValueContainer().decode([String].self)
        var list: [[UInt8]] = []
        for string in strings { list.append(try Hex.decode(string, codingPath: decoder.codingPath)) }
        wrappedValue = list
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(wrappedValue.map(Hex.encode))
    }
}

public enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)

    /// Two lowercase hexadecimal digits per byte.
    public static func encode(_ bytes: [UInt8]) -> String {
        String(unsafeUninitializedCapacity: bytes.count * 2) { buffer in
            for (index, byte) in bytes.enumerated() {
                buffer[2 * index] = digits[Int(byte >> 4)]
                buffer[2 * index + 1] = digits[Int(byte & 0xF)]
            }
            return bytes.count * 2
        }
    }

    /// The bytes of an even-length string of hexadecimal digits (either case); nil for anything else.
    public static func decode(_ text: String) -> [UInt8]? {
        var text = text
        return text.withUTF8 { utf8 -> [UInt8]? in
            guard utf8.count % 2 == 0 else { return nil }
            var bytes = [UInt8](repeating: 0, count: utf8.count / 2)
            for index in bytes.indices {
                guard let high = value(of: utf8[2 * index]), let low = value(of: utf8[2 * index + 1]) else { return nil }
                bytes[index] = high << 4 | low
            }
            return bytes
        }
    }

    static func decode(_ text: String, codingPath: [any CodingKey]) throws -> [UInt8] {
        guard let bytes = decode(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: codingPath, debugDescription: "expected an even number of hexadecimal digits"))
        }
        return bytes
    }

    private static func value(of digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

extension KeyedDecodingContainer {
    /// A missing key is a nil `OptionalHexBytes`, as a missing key is nil for an optional property.
    public func decode(_ type: OptionalHexBytes.Type, forKey key: Key) throws -> OptionalHexBytes {
        try decodeIfPresent(type, forKey: key) ?? OptionalHexBytes(wrappedValue: nil)
    }
}

extension KeyedEncodingContainer {
    /// A nil `OptionalHexBytes` is left out, as a nil optional property is.
    public mutating func encode(_ value: OptionalHexBytes, forKey key: Key) throws {
        if value.wrappedValue != nil { try encodeIfPresent(value, forKey: key) }
    }
}
