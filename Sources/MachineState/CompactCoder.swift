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
final class NodeEncoder: Encoder {
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }
    var storage: Storage = .unset

    enum Storage {
        case unset
        case value(Node)
        case keyed(KeyedBox)
        case array(ArrayBox)
    }

    init(path: [any CodingKey]) { codingPath = path }

    var node: Node {
        switch storage {
        case .unset: return .keyed([])
        case .value(let node): return node
        case .keyed(let box): return box.node
        case .array(let box): return box.node
        }
    }

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

/// Entries whose values may still be filled in (nested containers, super encoders).
final class KeyedBox {
    var entries: [(key: String, value: () -> Node)] = []
    var node: Node { .keyed(entries.map { ($0.key, $0.value()) }) }
    func set(_ key: String, _ value: @escaping () -> Node) {
        if let i = entries.firstIndex(where: { $0.key == key }) { entries[i].value = value } else { entries.append((key, value)) }
    }
}

final class ArrayBox {
    var elements: [() -> Node] = []
    var node: Node { .array(elements.map { $0() }) }
}

enum Primitive {
    static func node<T: Encodable>(_ value: T, path: [any CodingKey]) throws -> Node {
        switch value {
        case let v as Bool: return .bool(v)
        case let v as String: return .string(v)
        case let v as Double: return .double(v)
        case let v as Float: return .double(Double(v))
        case let v as Int: return .signed(Int64(v))
        case let v as Int8: return .signed(Int64(v))
        case let v as Int16: return .signed(Int64(v))
        case let v as Int32: return .signed(Int64(v))
        case let v as Int64: return .signed(v)
        case let v as UInt: return .unsigned(UInt64(v))
        case let v as UInt8: return .unsigned(UInt64(v))
        case let v as UInt16: return .unsigned(UInt64(v))
        case let v as UInt32: return .unsigned(UInt64(v))
        case let v as UInt64: return .unsigned(v)
        default:
            let encoder = NodeEncoder(path: path)
            try value.encode(to: encoder)
            return encoder.node
        }
    }
}

struct KeyedWriter<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let box: KeyedBox
    let codingPath: [any CodingKey]

    mutating func encodeNil(forKey key: Key) throws { box.set(key.stringValue) { .null } }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        let node = try Primitive.node(value, path: codingPath + [key])
        box.set(key.stringValue) { node }
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        let nested = KeyedBox()
        box.set(key.stringValue) { nested.node }
        return KeyedEncodingContainer(KeyedWriter<NestedKey>(box: nested, codingPath: codingPath + [key]))
    }
    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box.set(key.stringValue) { nested.node }
        return ArrayWriter(box: nested, codingPath: codingPath + [key])
    }
    mutating func superEncoder() -> any Encoder { superEncoder(named: "super") }
    mutating func superEncoder(forKey key: Key) -> any Encoder { superEncoder(named: key.stringValue) }
    private func superEncoder(named name: String) -> any Encoder {
        let encoder = NodeEncoder(path: codingPath)
        box.set(name) { encoder.node }
        return encoder
    }
}

struct ArrayWriter: UnkeyedEncodingContainer {
    let box: ArrayBox
    let codingPath: [any CodingKey]
    var count: Int { box.elements.count }

    mutating func encodeNil() throws { box.elements.append { .null } }
    mutating func encode<T: Encodable>(_ value: T) throws {
        let node = try Primitive.node(value, path: codingPath)
        box.elements.append { node }
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let nested = KeyedBox()
        box.elements.append { nested.node }
        return KeyedEncodingContainer(KeyedWriter<NestedKey>(box: nested, codingPath: codingPath))
    }
    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box.elements.append { nested.node }
        return ArrayWriter(box: nested, codingPath: codingPath)
    }
    mutating func superEncoder() -> any Encoder {
        let encoder = NodeEncoder(path: codingPath)
        box.elements.append { encoder.node }
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

struct NodeDecoder: Decoder {
    let node: Node
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(node: Node, path: [any CodingKey]) {
        self.node = node
        codingPath = path
    }

    func mismatch(_ expected: String) -> DecodingError {
        .typeMismatch(Any.self, .init(codingPath: codingPath, debugDescription: "expected \(expected), found \(node.kind)"))
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case .keyed(let entries) = node else { throw mismatch("a keyed container") }
        return KeyedDecodingContainer(KeyedReader<Key>(entries: entries, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case .array(let elements) = node else { throw mismatch("an array") }
        return ArrayReader(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleReader(decoder: self) }

    func decodePrimitive<T: Decodable>(_ type: T.Type) throws -> T {
        func integer<I: FixedWidthInteger>(_: I.Type) throws -> I {
            let value: I?
            switch node {
            case .signed(let v): value = I(exactly: v)
            case .unsigned(let v): value = I(exactly: v)
            default: throw mismatch("an integer")
            }
            guard let value else {
                throw DecodingError.dataCorrupted(.init(codingPath: codingPath, debugDescription: "\(node.kind) does not fit \(I.self)"))
            }
            return value
        }
        switch type {
        case is Bool.Type:
            guard case .bool(let v) = node else { throw mismatch("a boolean") }
            return v as! T
        case is String.Type:
            guard case .string(let v) = node else { throw mismatch("a string") }
            return v as! T
        case is Double.Type:
            guard case .double(let v) = node else { throw mismatch("a number") }
            return v as! T
        case is Float.Type:
            guard case .double(let v) = node else { throw mismatch("a number") }
            return Float(v) as! T
        case is Int.Type: return try integer(Int.self) as! T
        case is Int8.Type: return try integer(Int8.self) as! T
        case is Int16.Type: return try integer(Int16.self) as! T
        case is Int32.Type: return try integer(Int32.self) as! T
        case is Int64.Type: return try integer(Int64.self) as! T
        case is UInt.Type: return try integer(UInt.self) as! T
        case is UInt8.Type: return try integer(UInt8.self) as! T
        case is UInt16.Type: return try integer(UInt16.self) as! T
        case is UInt32.Type: return try integer(UInt32.self) as! T
        case is UInt64.Type: return try integer(UInt64.self) as! T
        default: return try T(from: self)
        }
    }
}

extension Node {
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
    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try NodeDecoder(node: try value(key), path: codingPath + [key]).decodePrimitive(type)
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

    mutating func next() throws -> NodeDecoder {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(Any.self, .init(codingPath: codingPath + [IndexKey(currentIndex)], debugDescription: "the array has only \(elements.count) elements"))
        }
        defer { currentIndex += 1 }
        return NodeDecoder(node: elements[currentIndex], path: codingPath + [IndexKey(currentIndex)])
    }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, case .null = elements[currentIndex] else { return false }
        currentIndex += 1
        return true
    }
    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T { try next().decodePrimitive(type) }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        try next().container(keyedBy: type)
    }
    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer { try next().unkeyedContainer() }
    mutating func superDecoder() throws -> any Decoder { try next() }
}

struct SingleReader: SingleValueDecodingContainer {
    let decoder: NodeDecoder
    var codingPath: [any CodingKey] { decoder.codingPath }
    func decodeNil() -> Bool {
        if case .null = decoder.node { return true }
        return false
    }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decoder.decodePrimitive(type) }
}
