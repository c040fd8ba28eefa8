import Glibc
import Synchronization
import SwiftletSystem

/// A writable disk that starts out as a read-only base image without copying it: what the guest
/// writes goes to an overlay file of the same size, in whole chunks; a chunk the overlay holds is
/// read from there, any other from the base. Many disks can share one base (forks of a machine).
///
/// The overlay is a sparse file and needs no map of its own: the chunks it holds are the ones its
/// filesystem has allocated (SEEK_DATA), because a chunk is only ever written whole: a write that
/// covers part of one first copies the rest from the base. So an overlay survives the VMM being
/// killed and can be opened again over its base.
public final class CopyOnWriteBlockBackend: BlockBackend {
    public let basePath: String
    /// The overlay's path, or a description of an unnamed one.
    public let overlayPath: String
    public let byteCount: UInt64
    /// The overlay's unit of copy-on-write: its filesystem's block size (at least 4 KiB, at most 1 MiB).
    public let chunkSize: UInt64
    private let base: OwnedFileDescriptor
    private let overlay: OwnedFileDescriptor
    /// One bit per chunk: set when the overlay holds it. Reads and writes hold the lock, so a
    /// chunk is never copied up twice or read half-copied.
    private let held: Mutex<[UInt64]>

    /// Opens `overlayPath` over `basePath`, creating the overlay (empty: the disk reads as the
    /// base) if it does not exist. An existing overlay must be the base's size.
    public convenience init(base basePath: String, overlay overlayPath: String) throws(SwiftletError) {
        let overlay = try OwnedFileDescriptor.open(overlayPath, flags: O_RDWR | O_CREAT, mode: 0o600, what: "disk overlay")
        try self.init(base: basePath, overlay: overlay, named: overlayPath)
    }

    /// Uses the open file `overlay` (for instance an unlinked temporary file: the writes are
    /// thrown away with it) as the overlay of `basePath`.
    public init(base basePath: String, overlay: consuming OwnedFileDescriptor, named overlayPath: String) throws(SwiftletError) {
        let base = try OwnedFileDescriptor.open(basePath, flags: O_RDONLY, what: "base disk")
        guard try base.isRegularFile(), try overlay.isRegularFile() else {
            throw SwiftletError(.invalidArgument, "a copy-on-write disk needs regular files: \(basePath) and \(overlayPath)")
        }
        let size = try base.size()
        guard size >= 512 else {
            throw SwiftletError(.invalidArgument, "disk \(basePath) is \(size) bytes: a disk needs at least one 512-byte sector")
        }
        let overlaySize = try overlay.size()
        let fresh = overlaySize == 0
        if fresh {
            let fd = overlay.rawValue
            try systemCall("cannot size the disk overlay \(overlayPath)") { ftruncate(fd, off_t(size)) }
        } else if overlaySize != size {
            throw SwiftletError(.invalidFormat, "disk overlay \(overlayPath) is \(overlaySize) bytes, but its base \(basePath) is \(size): it belongs to another disk")
        }
        var info = stat()
        let fd = overlay.rawValue
        try systemCall("cannot inspect \(overlayPath)") { fstat(fd, &info) }
        var chunk: UInt64 = 4096
        while chunk < UInt64(info.st_blksize) && chunk < 1 << 20 { chunk <<= 1 }
        let chunks = Int((size + chunk - 1) / chunk)
        var bitmap = [UInt64](repeating: 0, count: (chunks + 63) / 64)
        let ranges = try overlay.dataRanges(size: size)
        if fresh && !ranges.isEmpty {
            throw SwiftletError(.unsupported, "the filesystem holding \(overlayPath) does not keep files sparse (SEEK_HOLE): it cannot hold a copy-on-write disk")
        }
        for range in ranges {
            for index in Int(range.lowerBound / chunk)..<Int((range.upperBound + chunk - 1) / chunk) { Self.set(&bitmap, index) }
        }
        self.basePath = basePath
        self.overlayPath = overlayPath
        self.byteCount = size
        self.chunkSize = chunk
        self.base = base
        self.overlay = overlay
        self.held = Mutex(bitmap)
    }

    /// How many chunks the overlay holds.
    public var heldChunks: Int { held.withLock { $0.reduce(0) { $0 + $1.nonzeroBitCount } } }

    public func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        try checkBounds(offset, destination.count)
        try held.withLock { (bits: inout [UInt64]) throws(SwiftletError) in
            var done = 0
            while done < destination.count {
                let position = offset + UInt64(done)
                let index = Int(position / chunkSize)
                let count = Int(min(UInt64(destination.count - done), UInt64(index + 1) * chunkSize - position))
                // Adjacent chunks from the same file are read at once.
                var run = count
                let fromOverlay = Self.isSet(bits, index)
                var next = index + 1
                while done + run < destination.count && Self.isSet(bits, next) == fromOverlay {
                    run += Int(min(UInt64(destination.count - done - run), chunkSize))
                    next += 1
                }
                let piece = UnsafeMutableRawBufferPointer(rebasing: destination[done..<done + run])
                if fromOverlay {
                    try overlay.read(into: piece, at: position, what: "disk overlay \(overlayPath)")
                } else {
                    try base.read(into: piece, at: position, what: "disk \(basePath)")
                }
                done += run
            }
        }
    }

    public func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        try checkBounds(offset, source.count)
        try held.withLock { (bits: inout [UInt64]) throws(SwiftletError) in
            var done = 0
            while done < source.count {
                let position = offset + UInt64(done)
                let index = Int(position / chunkSize)
                let chunkStart = UInt64(index) * chunkSize
                let chunkEnd = min(chunkStart + chunkSize, byteCount)
                let count = Int(min(UInt64(source.count - done), chunkEnd - position))
                let piece = UnsafeRawBufferPointer(rebasing: source[done..<done + count])
                if Self.isSet(bits, index) || (position == chunkStart && UInt64(count) == chunkEnd - chunkStart) {
                    try overlay.write(from: piece, at: position, what: "disk overlay \(overlayPath)")
                } else {
                    // First write to part of this chunk: the whole chunk goes to the overlay.
                    let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunkEnd - chunkStart), alignment: 4096)
                    defer { whole.deallocate() }
                    try base.read(into: whole, at: chunkStart, what: "disk \(basePath)")
                    UnsafeMutableRawBufferPointer(rebasing: whole[Int(position - chunkStart)...]).copyMemory(from: piece)
                    try overlay.write(from: UnsafeRawBufferPointer(whole), at: chunkStart, what: "disk overlay \(overlayPath)")
                }
                Self.set(&bits, index)
                done += count
            }
        }
    }

    public func flush() throws(SwiftletError) {
        let fd = overlay.rawValue
        try systemCall("cannot flush disk overlay \(overlayPath)") { fdatasync(fd) }
    }

    public func dataRanges() throws(SwiftletError) -> [Range<UInt64>] {
        let baseRanges = try base.dataRanges(size: byteCount)
        let overlayRanges: [Range<UInt64>] = held.withLock { bits in
            var ranges: [Range<UInt64>] = []
            for index in 0..<Int((byteCount + chunkSize - 1) / chunkSize) where Self.isSet(bits, index) {
                ranges.appendMerging(UInt64(index) * chunkSize..<min(UInt64(index + 1) * chunkSize, byteCount))
            }
            return ranges
        }
        // The union of both, in order.
        var merged: [Range<UInt64>] = []
        for range in (baseRanges + overlayRanges).sorted(by: { $0.lowerBound < $1.lowerBound }) { merged.appendMerging(range) }
        return merged
    }

    private func checkBounds(_ offset: UInt64, _ count: Int) throws(SwiftletError) {
        guard offset <= byteCount, UInt64(count) <= byteCount - offset else {
            throw SwiftletError(.invalidArgument, "disk access at \(offset)+\(count) is past the end of \(overlayPath) (\(byteCount) bytes)")
        }
    }

    private static func set(_ bits: inout [UInt64], _ index: Int) {
        bits[index / 64] |= 1 << UInt64(index % 64)
    }

    private static func isSet(_ bits: [UInt64], _ index: Int) -> Bool {
        index / 64 < bits.count && bits[index / 64] >> UInt64(index % 64) & 1 != 0
    }
}
