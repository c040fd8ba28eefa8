import Glibc
import SwiftletSystem

/// Where a block device's bytes live. Reads and writes are whole or throw: a short read (the file
/// shrank under the guest) is an error, never silently zero-filled data.
public protocol BlockBackend: Sendable {
    /// The size in bytes when the device was created; the guest sees this many (rounded down to sectors).
    var byteCount: UInt64 { get }
    func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError)
    func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError)
    /// Makes every completed write durable.
    func flush() throws(SwiftletError)
    /// The byte ranges that may hold anything but zeros, in order; the rest of the disk reads as
    /// zeros. Lets a disk be copied sparsely.
    func dataRanges() throws(SwiftletError) -> [Range<UInt64>]
}

extension BlockBackend {
    public func dataRanges() throws(SwiftletError) -> [Range<UInt64>] { [0..<byteCount] }

    /// Writes the disk's content to a new sparse file at `path` (which must not exist): only its
    /// data ranges are read and written, holes stay holes. The file is synced before this returns;
    /// a failed copy removes it. Returns the bytes of data copied.
    @discardableResult
    public func copy(to path: String) throws(SwiftletError) -> UInt64 {
        let file = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "disk copy")
        do throws(SwiftletError) {
            try systemCall("cannot size \(path)") { ftruncate(file.rawValue, off_t(byteCount)) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            var copied: UInt64 = 0
            for range in try dataRanges() {
                copied += range.upperBound - range.lowerBound
                var offset = range.lowerBound
                while offset < range.upperBound {
                    let count = Int(min(UInt64(buffer.count), range.upperBound - offset))
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                    try read(into: piece, at: offset)
                    try file.write(from: UnsafeRawBufferPointer(piece), at: offset, what: path)
                    offset += UInt64(count)
                }
            }
            let fd = file.rawValue
            try systemCall("cannot sync \(path)") { fsync(fd) }
            return copied
        } catch {
            unlink(path)
            throw error
        }
    }
}

/// A disk image file (raw format) as a block backend.
public final class FileBlockBackend: BlockBackend {
    private let file: OwnedFileDescriptor
    public let path: String
    public let byteCount: UInt64

    /// Opens `path` read-only or read-write. The file must be a regular file or a block device.
    public init(path: String, readOnly: Bool) throws(SwiftletError) {
        let file = try OwnedFileDescriptor.open(path, flags: readOnly ? O_RDONLY : O_RDWR, what: "disk")
        var info = stat()
        try systemCall("cannot inspect disk \(path)") { fstat(file.rawValue, &info) }
        let kind = info.st_mode & S_IFMT
        if kind == S_IFBLK {
            var bytes: UInt64 = 0
            try systemCall("cannot size block device \(path)") { ioctl(file.rawValue, 0x8008_1272 /* BLKGETSIZE64 */, &bytes) }
            self.byteCount = bytes
        } else if kind == S_IFREG {
            self.byteCount = UInt64(info.st_size)
        } else {
            throw SwiftletError(.invalidArgument, "disk \(path) is not a regular file or a block device")
        }
        guard byteCount >= 512 else {
            throw SwiftletError(.invalidArgument, "disk \(path) is \(byteCount) bytes: a disk needs at least one 512-byte sector")
        }
        self.file = file
        self.path = path
    }

    public func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        try file.read(into: destination, at: offset, what: "disk \(path)")
    }

    public func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        try file.write(from: source, at: offset, what: "disk \(path)")
    }

    public func flush() throws(SwiftletError) {
        let fd = file.rawValue
        try systemCall("cannot flush disk \(path)") { fdatasync(fd) }
    }

    public func dataRanges() throws(SwiftletError) -> [Range<UInt64>] {
        try file.isRegularFile() ? file.dataRanges(size: byteCount) : [0..<byteCount]
    }
}

/// The medium of an empty drive: no bytes. A device over it shows the guest a disk of capacity
/// zero until a real disk is inserted (`VirtioBlock.insert`).
public struct EmptyBlockBackend: BlockBackend {
    public init() {}
    public var byteCount: UInt64 { 0 }

    public func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        guard destination.isEmpty else { throw SwiftletError(.invalidArgument, "the drive is empty") }
    }

    public func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        guard source.isEmpty else { throw SwiftletError(.invalidArgument, "the drive is empty") }
    }

    public func flush() throws(SwiftletError) {}
    public func dataRanges() throws(SwiftletError) -> [Range<UInt64>] { [] }
}
