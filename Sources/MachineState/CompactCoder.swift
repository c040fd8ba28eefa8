import SwiftletSystem

/// A compact binary encoding of `Codable` values, for the snapshot state file: each value is a
/// tag byte and its payload (little-endian).
///
///     0 nil   1 false   2 true
///     3 signed integer (8)   4 unsigned integer (8)   5 floating point (8, IEEE 754 double)
///     6 string: byte count (4), UTF-8
///     7 array: byte count of what follows (4), element count (4), elements
///     8 keyed: byte count of what follows (4), entry count (4), entries: key as a string payload
///       (byte count, UTF-8), then the value
///
/// Why not JSON: a restore reads the state on its critical path, and a JSON decoder checks each
/// type it meets against its special cases (dates, data, URLs, string-keyed dictionaries) with a
/// protocol-conformance lookup, which in a static executable scans every conformance record the
/// first time: most of a restore's state decoding (1.4 ms, 0.55 of it when repeated in-process).
/// Keyed entries may come in any order and missing keys read as absent, so a type's `Codable`
/// code works as it would with JSON.
public enum CompactCoder {
    enum Tag: UInt8 {
        case null = 0, no, yes, signed, unsigned, double, string, array, keyed
    }

    public static func encode<T: Encodable>(_ value: T) throws(SwiftletError) -> [UInt8] {
        let encoder = NodeEncoder(path: [])
        do { try value.encode(to: encoder) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode \(T.self): \(error)")
        }
        var bytes: [UInt8] = []
        encoder.node.write(into: &bytes)
        return bytes
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws(SwiftletError) -> T {
        var reader = NodeReader(bytes: bytes)
        let node: Node
        do {
            node = try reader.read(depth: 0)
            guard reader.offset == bytes.count else { throw CompactError("\(bytes.count - reader.offset) bytes after the value") }
            return try T(from: NodeDecoder(node: node, path: []))
        } catch let error as CompactError {
            throw SwiftletError(.invalidFormat, error.message)
        } catch let error as DecodingError {
            throw SwiftletError(.invalidFormat, Self.describe(error))
        } catch {
            throw SwiftletError(.invalidFormat, "\(error)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            context.codingPath.isEmpty ? "the top level" : context.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context): return "\(path(context)): no \(key.stringValue)"
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}

struct CompactError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// A decoded value.
indirect enum Node {
    case null
    case bool(Bool)
    case signed(Int64)
    case unsigned(UInt64)
    case double(Double)
    case string(String)
    case array([Node])
    case keyed([(key: String, value: Node)])

    func write(into bytes: inout [UInt8]) {
        func u32(_ value: Int) { LittleEndian.append(UInt64(UInt32(value)), 4, to: &bytes) }
        func u64(_ value: UInt64) { LittleEndian.append(value, 8, to: &bytes) }
        func string(_ s: String) {
            var s = s
            s.withUTF8 { u32($0.count); bytes += $0 }
        }
        /// Writes a byte count of 0 and returns where it goes.
        func openSized(_ tag: CompactCoder.Tag, count: Int) -> Int {
            bytes.append(tag.rawValue)
            let at = bytes.count
            u32(0)
            u32(count)
            return at
        }
        func closeSized(_ at: Int) {
            LittleEndian.write(UInt64(UInt32(bytes.count - at - 4)), 4, into: &bytes, at: at)
        }
        switch self {
        case .null: bytes.append(CompactCoder.Tag.null.rawValue)
        case .bool(let b): bytes.append(b ? CompactCoder.Tag.yes.rawValue : CompactCoder.Tag.no.rawValue)
        case .signed(let v): bytes.append(CompactCoder.Tag.signed.rawValue); u64(UInt64(bitPattern: v))
        case .unsigned(let v): bytes.append(CompactCoder.Tag.unsigned.rawValue); u64(v)
        case .double(let v): bytes.append(CompactCoder.Tag.double.rawValue); u64(v.bitPattern)
        case .string(let s): bytes.append(CompactCoder.Tag.string.rawValue); string(s)
        case .array(let elements):
            let at = openSized(.array, count: elements.count)
            for element in elements { element.write(into: &bytes) }
            closeSized(at)
        case .keyed(let entries):
            let at = openSized(.keyed, count: entries.count)
            for entry in entries {
                string(entry.key)
                entry.value.write(into: &bytes)
            }
            closeSized(at)
        }
    }
}

/// Parses bytes into a `Node`, checking every length against what is left.
struct NodeReader {
    let bytes: [UInt8]
    var offset = 0
    static let maximumDepth = 64

    mutating func take(_ count: Int) throws(CompactError) -> Range<Int> {
        guard count >= 0, count <= bytes.count - offset else { throw CompactError("a value runs past the end of the state at byte \(offset)") }
        defer { offset += count }
        return offset..<offset + count
    }

    mutating func u32() throws(CompactError) -> Int { Int(LittleEndian.read(bytes, at: try take(4).lowerBound, count: 4)) }
    mutating func u64() throws(CompactError) -> UInt64 { LittleEndian.read(bytes, at: try take(8).lowerBound, count: 8) }

    mutating func string() throws(CompactError) -> String {
        let range = try take(try u32())
        guard let s = String(validating: bytes[range], as: UTF8.self) else { throw CompactError("a string at byte \(range.lowerBound) is not UTF-8") }
        return s
    }

    mutating func read(depth: Int) throws(CompactError) -> Node {
        guard depth < Self.maximumDepth else { throw CompactError("values nest deeper than \(Self.maximumDepth)") }
        let at = offset
        guard let tag = CompactCoder.Tag(rawValue: bytes[try take(1).lowerBound]) else {
            throw CompactError("unknown value tag \(bytes[at]) at byte \(at)")
        }
        switch tag {
        case .null: return .null
        case .no: return .bool(false)
        case .yes: return .bool(true)
        case .signed: return .signed(Int64(bitPattern: try u64()))
        case .unsigned: return .unsigned(try u64())
        case .double: return .double(Double(bitPattern: try u64()))
        case .string: return .string(try string())
        case .array, .keyed:
            let size = try u32()
            guard size <= bytes.count - offset else { throw CompactError("a value runs past the end of the state at byte \(at)") }
            let end = offset + size
            let count = try u32()
            guard count <= size else { throw CompactError("a container at byte \(at) announces more entries than it has bytes") }
            var node: Node
            if tag == .array {
                var elements: [Node] = []
                elements.reserveCapacity(count)
                for _ in 0..<count { elements.append(try read(depth: depth + 1)) }
                node = .array(elements)
            } else {
                var entries: [(key: String, value: Node)] = []
                entries.reserveCapacity(count)
                for _ in 0..<count { entries.append((try string(), try read(depth: depth + 1))) }
                node = .keyed(entries)
            }
            guard offset == end else { throw CompactError("a container at byte \(at) is not the size it announces") }
            return node
        }
    }
}

// MARK: - Encoding

/// Builds a `Node` tree; containers are boxes so that nested containers fill in later.
/// Primitives become nodes at once, through the containers' concrete overloads (no dynamic cast,
/// no closure, no coding path unless a nested value needs one): a snapshot's state is mostly
/// integers, and a restore or a migration's pause waits for its encoding and decoding.
final class NodeEncoder: Encoder {
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }
    var storage: Slot?

    init(path: [any CodingKey]) { codingPath = path }

    var node: Node { storage?.node ?? .keyed([]) }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        let box: KeyedBox
        if case .keyed(let existing) = storage { box = existing } else { box = KeyedBox(); storage = .keyed(box) }
        return KeyedEncodingContainer(KeyedWriter<Key>(box: box, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        let box: ArrayBox
        if case .array(let existing) = storage { box = existing } else { box = ArrayBox(); storage = .array(box) }
        return ArrayWriter(box: box, codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleWriter(encoder: self) }
}

/// A value in a container: a finished node, or a container (or encoder) still being filled.
enum Slot {
    case value(Node)
    case keyed(KeyedBox)
    case array(ArrayBox)
    case encoder(NodeEncoder)

    var node: Node {
        switch self {
        case .value(let node): node
        case .keyed(let box): box.node
        case .array(let box): box.node
        case .encoder(let encoder): encoder.node
        }
    }
}

/// Entries whose values may still be filled in (nested containers, super encoders). A key set
/// twice keeps its first place and takes its last value.
final class KeyedBox {
    var entries: [(key: String, value: Slot)] = []
    var node: Node { .keyed(entries.map { ($0.key, $0.value.node) }) }
    func set(_ key: String, _ value: Slot) {
        if let i = entries.firstIndex(where: { $0.key == key }) { entries[i].value = value } else { entries.append((key, value)) }
    }
}

final class ArrayBox {
    var elements: [Slot] = []
    var node: Node { .array(elements.map(\.node)) }
}

enum Primitive {
    /// `value` as a node: a primitive by its type's identity (a pointer comparison, no dynamic
    /// cast), anything else through its own `encode(to:)` at `path` (made only then).
    static func node<T: Encodable>(_ value: T, path: @autoclosure () -> [any CodingKey]) throws -> Node {
        if T.self == UInt64.self { return .unsigned(unsafeBitCast(value, to: UInt64.self)) }
        if T.self == UInt32.self { return .unsigned(UInt64(unsafeBitCast(value, to: UInt32.self))) }
        if T.self == String.self { return .string(unsafeBitCast(value, to: String.self)) }
        if T.self == Bool.self { return .bool(unsafeBitCast(value, to: Bool.self)) }
        if T.self == Int.self { return .signed(Int64(unsafeBitCast(value, to: Int.self))) }
        if T.self == UInt8.self { return .unsigned(UInt64(unsafeBitCast(value, to: UInt8.self))) }
        if T.self == UInt16.self { return .unsigned(UInt64(unsafeBitCast(value, to: UInt16.self))) }
        if T.self == UInt.self { return .unsigned(UInt64(unsafeBitCast(value, to: UInt.self))) }
        if T.self == Int64.self { return .signed(unsafeBitCast(value, to: Int64.self)) }
        if T.self == Int32.self { return .signed(Int64(unsafeBitCast(value, to: Int32.self))) }
        if T.self == Int16.self { return .signed(Int64(unsafeBitCast(value, to: Int16.self))) }
        if T.self == Int8.self { return .signed(Int64(unsafeBitCast(value, to: Int8.self))) }
        if T.self == Double.self { return .double(unsafeBitCast(value, to: Double.self)) }
        if T.self == Float.self { return .double(Double(unsafeBitCast(value, to: Float.self))) }
        let encoder = NodeEncoder(path: path())
        try value.encode(to: encoder)
        return encoder.node
    }
}

struct KeyedWriter<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let box: KeyedBox
    let codingPath: [any CodingKey]

    mutating func encodeNil(forKey key: Key) throws { box.set(key.stringValue, .value(.null)) }
    mutating func encode(_ value: Bool, forKey key: Key) throws { box.set(key.stringValue, .value(.bool(value))) }
    mutating func encode(_ value: String, forKey key: Key) throws { box.set(key.stringValue, .value(.string(value))) }
    mutating func encode(_ value: Double, forKey key: Key) throws { box.set(key.stringValue, .value(.double(value))) }
    mutating func encode(_ value: Float, forKey key: Key) throws { box.set(key.stringValue, .value(.double(Double(value)))) }
    mutating func encode(_ value: Int, forKey key: Key) throws { box.set(key.stringValue, .value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { box.set(key.stringValue, .value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { box.set(key.stringValue, .value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { box.set(key.stringValue, .value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { box.set(key.stringValue, .value(.signed(value))) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { box.set(key.stringValue, .value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { box.set(key.stringValue, .value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { box.set(key.stringValue, .value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { box.set(key.stringValue, .value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { box.set(key.stringValue, .value(.unsigned(value))) }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        box.set(key.stringValue, .value(try Primitive.node(value, path: codingPath + [key])))
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        let nested = KeyedBox()
        box.set(key.stringValue, .keyed(nested))
        return KeyedEncodingContainer(KeyedWriter<NestedKey>(box: nested, codingPath: codingPath + [key]))
    }
    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box.set(key.stringValue, .array(nested))
        return ArrayWriter(box: nested, codingPath: codingPath + [key])
    }
    mutating func superEncoder() -> any Encoder { superEncoder(named: "super") }
    mutating func superEncoder(forKey key: Key) -> any Encoder { superEncoder(named: key.stringValue) }
    private func superEncoder(named name: String) -> any Encoder {
        let encoder = NodeEncoder(path: codingPath)
        box.set(name, .encoder(encoder))
        return encoder
    }
}

struct ArrayWriter: UnkeyedEncodingContainer {
    let box: ArrayBox
    let codingPath: [any CodingKey]
    var count: Int { box.elements.count }

    mutating func encodeNil() throws { box.elements.append(.value(.null)) }
    mutating func encode(_ value: Bool) throws { box.elements.append(.value(.bool(value))) }
    mutating func encode(_ value: String) throws { box.elements.append(.value(.string(value))) }
    mutating func encode(_ value: Double) throws { box.elements.append(.value(.double(value))) }
    mutating func encode(_ value: Float) throws { box.elements.append(.value(.double(Double(value)))) }
    mutating func encode(_ value: Int) throws { box.elements.append(.value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int8) throws { box.elements.append(.value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int16) throws { box.elements.append(.value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int32) throws { box.elements.append(.value(.signed(Int64(value)))) }
    mutating func encode(_ value: Int64) throws { box.elements.append(.value(.signed(value))) }
    mutating func encode(_ value: UInt) throws { box.elements.append(.value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt8) throws { box.elements.append(.value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt16) throws { box.elements.append(.value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt32) throws { box.elements.append(.value(.unsigned(UInt64(value)))) }
    mutating func encode(_ value: UInt64) throws { box.elements.append(.value(.unsigned(value))) }
    mutating func encode<T: Encodable>(_ value: T) throws {
        box.elements.append(.value(try Primitive.node(value, path: codingPath)))
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let nested = KeyedBox()
        box.elements.append(.keyed(nested))
        return KeyedEncodingContainer(KeyedWriter<NestedKey>(box: nested, codingPath: codingPath))
    }
    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box.elements.append(.array(nested))
        return ArrayWriter(box: nested, codingPath: codingPath)
    }
    mutating func superEncoder() -> any Encoder {
        let encoder = NodeEncoder(path: codingPath)
        box.elements.append(.encoder(encoder))
        return encoder
    }
}

struct SingleWriter: SingleValueEncodingContainer {
    let encoder: NodeEncoder
    var codingPath: [any CodingKey] { encoder.codingPath }
    mutating func encodeNil() throws { encoder.storage = .value(.null) }
    mutating func encode<T: Encodable>(_ value: T) throws { encoder.storage = .value(try Primitive.node(value, path: codingPath)) }
}

// MARK: - Decoding

/// Primitives read straight off their node (the containers' concrete overloads, and the generic
/// path by type identity); the coding path is built only for an error or a nested value.
extension Node {
    func mismatch(_ expected: String, at path: [any CodingKey]) -> DecodingError {
        .typeMismatch(Any.self, .init(codingPath: path, debugDescription: "expected \(expected), found \(kind)"))
    }

    func bool(at path: @autoclosure () -> [any CodingKey]) throws -> Bool {
        guard case .bool(let v) = self else { throw mismatch("a boolean", at: path()) }
        return v
    }

    func string(at path: @autoclosure () -> [any CodingKey]) throws -> String {
        guard case .string(let v) = self else { throw mismatch("a string", at: path()) }
        return v
    }

    func double(at path: @autoclosure () -> [any CodingKey]) throws -> Double {
        guard case .double(let v) = self else { throw mismatch("a number", at: path()) }
        return v
    }

    func integer<I: FixedWidthInteger>(_: I.Type, at path: @autoclosure () -> [any CodingKey]) throws -> I {
        let value: I?
        switch self {
        case .signed(let v): value = I(exactly: v)
        case .unsigned(let v): value = I(exactly: v)
        default: throw mismatch("an integer", at: path())
        }
        guard let value else {
            throw DecodingError.dataCorrupted(.init(codingPath: path(), debugDescription: "\(kind) does not fit \(I.self)"))
        }
        return value
    }

    /// A primitive `T` by its type's identity (a pointer comparison, no dynamic cast), or nil
    /// when `T` is not one.
    func primitive<T>(_ type: T.Type, at path: @autoclosure () -> [any CodingKey]) throws -> T? {
        if T.self == UInt64.self { return unsafeBitCast(try integer(UInt64.self, at: path()), to: T.self) }
        if T.self == UInt32.self { return unsafeBitCast(try integer(UInt32.self, at: path()), to: T.self) }
        if T.self == String.self { return unsafeBitCast(try string(at: path()), to: T.self) }
        if T.self == Bool.self { return unsafeBitCast(try bool(at: path()), to: T.self) }
        if T.self == Int.self { return unsafeBitCast(try integer(Int.self, at: path()), to: T.self) }
        if T.self == UInt8.self { return unsafeBitCast(try integer(UInt8.self, at: path()), to: T.self) }
        if T.self == UInt16.self { return unsafeBitCast(try integer(UInt16.self, at: path()), to: T.self) }
        if T.self == UInt.self { return unsafeBitCast(try integer(UInt.self, at: path()), to: T.self) }
        if T.self == Int64.self { return unsafeBitCast(try integer(Int64.self, at: path()), to: T.self) }
        if T.self == Int32.self { return unsafeBitCast(try integer(Int32.self, at: path()), to: T.self) }
        if T.self == Int16.self { return unsafeBitCast(try integer(Int16.self, at: path()), to: T.self) }
        if T.self == Int8.self { return unsafeBitCast(try integer(Int8.self, at: path()), to: T.self) }
        if T.self == Double.self { return unsafeBitCast(try double(at: path()), to: T.self) }
        if T.self == Float.self { return unsafeBitCast(Float(try double(at: path())), to: T.self) }
        return nil
    }

    /// `T` from this node at `path`: a primitive directly, anything else by its own `init(from:)`.
    func decode<T: Decodable>(_ type: T.Type, at path: @autoclosure () -> [any CodingKey]) throws -> T {
        if let value = try primitive(type, at: path()) { return value }
        return try T(from: NodeDecoder(node: self, path: path()))
    }

    var kind: String {
        switch self {
        case .null: "nil"
        case .bool: "a boolean"
        case .signed(let v): "the integer \(v)"
        case .unsigned(let v): "the integer \(v)"
        case .double: "a number"
        case .string: "a string"
        case .array: "an array"
        case .keyed: "a keyed container"
        }
    }
}

struct NodeDecoder: Decoder {
    let node: Node
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(node: Node, path: [any CodingKey]) {
        self.node = node
        codingPath = path
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case .keyed(let entries) = node else { throw node.mismatch("a keyed container", at: codingPath) }
        return KeyedDecodingContainer(KeyedReader<Key>(entries: entries, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case .array(let elements) = node else { throw node.mismatch("an array", at: codingPath) }
        return ArrayReader(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleReader(decoder: self) }
}

struct KeyedReader<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let entries: [(key: String, value: Node)]
    let codingPath: [any CodingKey]
    var allKeys: [Key] { entries.compactMap { Key(stringValue: $0.key) } }

    func find(_ key: Key) -> Node? {
        let name = key.stringValue
        return entries.first { $0.key == name }?.value
    }
    func value(_ key: Key) throws -> Node {
        guard let node = find(key) else {
            throw DecodingError.keyNotFound(key, .init(codingPath: codingPath, debugDescription: "no \(key.stringValue)"))
        }
        return node
    }

    func contains(_ key: Key) -> Bool { find(key) != nil }
    func decodeNil(forKey key: Key) throws -> Bool {
        if case .null = try value(key) { return true }
        return false
    }
    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try value(key).bool(at: codingPath + [key]) }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try value(key).string(at: codingPath + [key]) }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try value(key).double(at: codingPath + [key]) }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { Float(try value(key).double(at: codingPath + [key])) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try value(key).integer(type, at: codingPath + [key]) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try value(key).integer(type, at: codingPath + [key]) }
    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try value(key).decode(type, at: codingPath + [key])
    }
    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try NodeDecoder(node: try value(key), path: codingPath + [key]).container(keyedBy: type)
    }
    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try NodeDecoder(node: try value(key), path: codingPath + [key]).unkeyedContainer()
    }
    func superDecoder() throws -> any Decoder { NodeDecoder(node: entries.first { $0.key == "super" }?.value ?? .null, path: codingPath) }
    func superDecoder(forKey key: Key) throws -> any Decoder { NodeDecoder(node: find(key) ?? .null, path: codingPath + [key]) }
}

struct IndexKey: CodingKey {
    let intValue: Int?
    var stringValue: String { "\(intValue ?? 0)" }
    init(_ index: Int) { intValue = index }
    init?(stringValue: String) { nil }
    init?(intValue: Int) { self.intValue = intValue }
}

struct ArrayReader: UnkeyedDecodingContainer {
    let elements: [Node]
    let codingPath: [any CodingKey]
    var currentIndex = 0
    var count: Int? { elements.count }
    var isAtEnd: Bool { currentIndex >= elements.count }

    init(elements: [Node], codingPath: [any CodingKey]) {
        self.elements = elements
        self.codingPath = codingPath
    }

    /// The next element, and its path (built only when asked for).
    mutating func next() throws -> (node: Node, index: Int) {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(Any.self, .init(codingPath: codingPath + [IndexKey(currentIndex)], debugDescription: "the array has only \(elements.count) elements"))
        }
        defer { currentIndex += 1 }
        return (elements[currentIndex], currentIndex)
    }

    func path(_ index: Int) -> [any CodingKey] { codingPath + [IndexKey(index)] }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, case .null = elements[currentIndex] else { return false }
        currentIndex += 1
        return true
    }
    mutating func decode(_ type: Bool.Type) throws -> Bool { let (node, i) = try next(); return try node.bool(at: path(i)) }
    mutating func decode(_ type: String.Type) throws -> String { let (node, i) = try next(); return try node.string(at: path(i)) }
    mutating func decode(_ type: Double.Type) throws -> Double { let (node, i) = try next(); return try node.double(at: path(i)) }
    mutating func decode(_ type: Float.Type) throws -> Float { let (node, i) = try next(); return Float(try node.double(at: path(i))) }
    mutating func decode(_ type: Int.Type) throws -> Int { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: Int8.Type) throws -> Int8 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: Int16.Type) throws -> Int16 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: Int32.Type) throws -> Int32 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: Int64.Type) throws -> Int64 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: UInt.Type) throws -> UInt { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 { let (node, i) = try next(); return try node.integer(type, at: path(i)) }
    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        let (node, i) = try next()
        return try node.decode(type, at: path(i))
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        let (node, i) = try next()
        return try NodeDecoder(node: node, path: path(i)).container(keyedBy: type)
    }
    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (node, i) = try next()
        return try NodeDecoder(node: node, path: path(i)).unkeyedContainer()
    }
    mutating func superDecoder() throws -> any Decoder {
        let (node, i) = try next()
        return NodeDecoder(node: node, path: path(i))
    }
}

struct SingleReader: SingleValueDecodingContainer {
    let decoder: NodeDecoder
    var codingPath: [any CodingKey] { decoder.codingPath }
    func decodeNil() -> Bool {
        if case .null = decoder.node { return true }
        return false
    }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decoder.node.decode(type, at: decoder.codingPath) }
}
