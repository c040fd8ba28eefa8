import SwiftletSystem

/// The snapshot state file: a fixed header (magic, format version, payload size, SHA-256 of the
/// payload) and the state in `CompactCoder`'s binary encoding. See docs/snapshot-format.md.
///
/// Any change to the payload that an older Swiftlet could misread bumps `version`; a reader
/// refuses every version but its own rather than guess.
public enum StateFile {
    public static let magic: [UInt8] = Array("SWLTSNAP".utf8)
    public static let version: UInt32 = 4
    public static let headerSize = 64

    /// The header and payload for `value`.
    public static func encode<T: Encodable>(_ value: T) throws(SwiftletError) -> [UInt8] {
        file(payload: try CompactCoder.encode(value))
    }

    /// The header and `payload` (a value's `CompactCoder` encoding).
    public static func file(payload: [UInt8]) -> [UInt8] {
        var header = magic
        header += LittleEndian.bytes(UInt64(version), 4) + LittleEndian.bytes(UInt64(headerSize), 4) + LittleEndian.bytes(UInt64(payload.count), 8)
        header += SHA256.hash(payload)
        header += [UInt8](repeating: 0, count: headerSize - header.count)
        return header + payload
    }

    /// Checks the header and the checksum, then decodes the payload. `path` names the file in errors.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8], path: String) throws(SwiftletError) -> T {
        guard bytes.count >= headerSize, Array(bytes[0..<8]) == magic else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet snapshot state file")
        }
        let version = UInt32(LittleEndian.read(bytes, at: 8, count: 4))
        guard version == Self.version else {
            throw SwiftletError(.unsupported, "\(path) is snapshot format version \(version); this Swiftlet reads version \(Self.version) only: take the snapshot again with this Swiftlet")
        }
        let declaredHeader = Int(LittleEndian.read(bytes, at: 12, count: 4))
        let payloadSize = LittleEndian.read(bytes, at: 16, count: 8)
        guard declaredHeader == headerSize, UInt64(bytes.count - headerSize) == payloadSize else {
            throw SwiftletError(.invalidFormat, "\(path) is truncated or padded: its header announces \(payloadSize) bytes of state, the file holds \(bytes.count - min(bytes.count, headerSize))")
        }
        let payload = Array(bytes[headerSize...])
        guard SHA256.hash(payload) == Array(bytes[24..<56]) else {
            throw SwiftletError(.invalidFormat, "\(path) is corrupt: its checksum does not match its contents")
        }
        do {
            return try CompactCoder.decode(T.self, from: payload)
        } catch {
            throw SwiftletError(.invalidFormat, "\(path) has a valid checksum but state this Swiftlet cannot read: \(error.message)")
        }
    }
}
