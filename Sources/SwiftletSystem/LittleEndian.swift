/// Little-endian integers in byte arrays, for the binary formats Swiftlet writes and reads
/// (firmware tables, EROFS images, snapshot files).
public enum LittleEndian {
    /// The low `count` bytes of `value`, least significant first.
    public static func bytes(_ value: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }

    /// The `count` bytes at `offset` of `bytes`, least significant first, as an integer.
    public static func read(_ bytes: [UInt8], at offset: Int, count: Int) -> UInt64 {
        (0..<count).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }
}
