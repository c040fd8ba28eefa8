/// Little-endian integers in byte arrays, for the binary formats Swiftlet writes and reads
/// (firmware tables, EROFS images, snapshot files, virtio headers).
public enum LittleEndian {
    /// The low `count` bytes of `value`, least significant first.
    public static func bytes(_ value: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }

    /// The `count` bytes at `offset` of `bytes`, least significant first, as an integer.
    @inlinable
    public static func read(_ bytes: [UInt8], at offset: Int, count: Int) -> UInt64 {
        (0..<count).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }

    /// Appends the low `count` bytes of `value`, least significant first, to `bytes`.
    @inlinable
    public static func append(_ value: UInt64, _ count: Int, to bytes: inout [UInt8]) {
        for i in 0..<count { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }

    /// Overwrites the `count` bytes at `offset` of `bytes` with the low `count` bytes of `value`,
    /// least significant first.
    @inlinable
    public static func write(_ value: UInt64, _ count: Int, into bytes: inout [UInt8], at offset: Int) {
        for i in 0..<count { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }
}
