import SwiftletSystem

/// The parts of the FUSE protocol (linux/fuse.h, 7.31 and later) a virtio-fs device speaks:
/// opcodes, flags, and the fixed-size structures read from requests and written into replies.
/// All little-endian (x86 guests), all bounds-checked by `FuseReader`.
public enum Fuse {
    public static let major: UInt32 = 7
    public static let minimumMinor: UInt32 = 27
    public static let minor: UInt32 = 31
    public static let inHeaderSize = 40
    public static let outHeaderSize = 16
    public static let rootNode: UInt64 = 1

    public enum Opcode: UInt32 {
        case lookup = 1, forget = 2, getattr = 3, setattr = 4, readlink = 5, symlink = 6, mknod = 8, mkdir = 9
        case unlink = 10, rmdir = 11, rename = 12, link = 13, open = 14, read = 15, write = 16, statfs = 17
        case release = 18, fsync = 20, setxattr = 21, getxattr = 22, listxattr = 23, removexattr = 24, flush = 25
        case initialize = 26, opendir = 27, readdir = 28, releasedir = 29, fsyncdir = 30, getlk = 31, setlk = 32
        case setlkw = 33, access = 34, create = 35, interrupt = 36, bmap = 37, destroy = 38, ioctl = 39, poll = 40
        case batchForget = 42, fallocate = 43, readdirplus = 44, rename2 = 45, lseek = 46, copyFileRange = 47
        case syncfs = 50
    }

    /// FUSE_INIT flags the server turns on (when the guest offers them).
    public enum InitFlag {
        public static let asyncRead: UInt32 = 1 << 0
        public static let atomicTruncate: UInt32 = 1 << 3
        public static let bigWrites: UInt32 = 1 << 5
        public static let doReaddirplus: UInt32 = 1 << 13
        public static let readdirplusAuto: UInt32 = 1 << 14
        public static let parallelDirops: UInt32 = 1 << 18
        public static let maxPages: UInt32 = 1 << 22
        public static let cacheSymlinks: UInt32 = 1 << 23
    }

    /// fuse_open_out's `open_flags`.
    public enum OpenFlag {
        /// Reads and writes of this open file bypass the guest's page cache.
        public static let directIO: UInt32 = 1 << 0
    }

    /// SETATTR's `valid` bits.
    public enum SetattrValid {
        public static let mode: UInt32 = 1 << 0
        public static let uid: UInt32 = 1 << 1
        public static let gid: UInt32 = 1 << 2
        public static let size: UInt32 = 1 << 3
        public static let atime: UInt32 = 1 << 4
        public static let mtime: UInt32 = 1 << 5
        public static let handle: UInt32 = 1 << 6
        public static let atimeNow: UInt32 = 1 << 7
        public static let mtimeNow: UInt32 = 1 << 8
    }

    /// The request header.
    public struct InHeader: Equatable, Sendable {
        public var length: UInt32
        public var opcode: UInt32
        public var unique: UInt64
        public var node: UInt64
        public var uid: UInt32
        public var gid: UInt32
        public var pid: UInt32
    }
}

/// Reads little-endian fields from a request's bytes; past the end it fails (never traps).
struct FuseReader {
    let bytes: [UInt8]
    var position: Int

    init(_ bytes: [UInt8], at position: Int = 0) { self.bytes = bytes; self.position = position }

    var remaining: Int { bytes.count - position }

    mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        defer { position += 4 }
        return UInt32(LittleEndian.read(bytes, at: position, count: 4))
    }

    mutating func u64() -> UInt64? {
        guard remaining >= 8 else { return nil }
        defer { position += 8 }
        return LittleEndian.read(bytes, at: position, count: 8)
    }

    mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, remaining >= count else { return false }
        position += count
        return true
    }

    /// A NUL-terminated string (the NUL consumed, not returned).
    mutating func cString() -> [UInt8]? {
        guard let end = bytes[position...].firstIndex(of: 0) else { return nil }
        defer { position = end + 1 }
        return Array(bytes[position..<end])
    }

    mutating func rest() -> ArraySlice<UInt8> {
        defer { position = bytes.count }
        return bytes[position...]
    }

    static func header(_ bytes: [UInt8]) -> Fuse.InHeader? {
        var r = FuseReader(bytes)
        guard let length = r.u32(), let opcode = r.u32(), let unique = r.u64(), let node = r.u64(),
              let uid = r.u32(), let gid = r.u32(), let pid = r.u32(), r.skip(4) else { return nil }
        return Fuse.InHeader(length: length, opcode: opcode, unique: unique, node: node, uid: uid, gid: gid, pid: pid)
    }
}

/// Builds a reply's body.
struct FuseWriter {
    var bytes: [UInt8] = []

    mutating func u16(_ v: UInt16) { LittleEndian.append(UInt64(v), 2, to: &bytes) }
    mutating func u32(_ v: UInt32) { LittleEndian.append(UInt64(v), 4, to: &bytes) }
    mutating func u64(_ v: UInt64) { LittleEndian.append(v, 8, to: &bytes) }
    mutating func zeros(_ n: Int) { bytes += [UInt8](repeating: 0, count: n) }
    mutating func pad8() { zeros((8 - bytes.count % 8) % 8) }
}

/// A file's attributes as the guest sees them (struct fuse_attr).
struct FuseAttributes {
    var inode: UInt64
    var size: UInt64
    var blocks: UInt64
    var atime: (UInt64, UInt32)
    var mtime: (UInt64, UInt32)
    var ctime: (UInt64, UInt32)
    var mode: UInt32
    var links: UInt32
    var uid: UInt32
    var gid: UInt32
    var rdev: UInt32
    var blockSize: UInt32

    func write(to w: inout FuseWriter) {
        w.u64(inode); w.u64(size); w.u64(blocks)
        w.u64(atime.0); w.u64(mtime.0); w.u64(ctime.0)
        w.u32(atime.1); w.u32(mtime.1); w.u32(ctime.1)
        w.u32(mode); w.u32(links); w.u32(uid); w.u32(gid); w.u32(rdev); w.u32(blockSize); w.u32(0)
    }
}
