import Glibc
import SwiftletDigest
import SwiftletSystem

/// Reads a pack (docs/pack-format.md), which is untrusted input: the footer and the manifest are
/// checked when it is opened (the manifest against the footer's digest, then every field a read
/// relies on), and every chunk against its own digest as it is read, so a damaged, cut or
/// altered pack is refused with a message naming the part, before its bytes are used.
public final class PackReader {
    public let path: String
    public let manifest: PackManifest
    /// Where the pack starts in the file: 0, or the size of the executable it follows.
    public let start: UInt64
    public let fileSize: UInt64
    private let file: OwnedFileDescriptor
    private let compression: PackCompression

    public init(path: String) throws(SwiftletError) {
        self.path = path
        file = try OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY | O_CLOEXEC, what: "the pack")
        fileSize = try file.size()
        guard fileSize >= UInt64(PackFooter.size) else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet pack (\(fileSize) bytes: too short for one)")
        }
        let footer = try PackFooter(bytes: try file.read(count: PackFooter.size, at: fileSize - UInt64(PackFooter.size), what: path),
                                    fileSize: fileSize, path: path)
        start = footer.packStart(fileSize: fileSize)
        let bytes = try file.read(count: Int(footer.manifestLength), at: start + footer.manifestOffset, what: path)
        guard SHA256.hash(bytes) == footer.manifestDigest else {
            throw SwiftletError(.invalidFormat, "\(path) has a damaged pack manifest: its SHA-256 is not the one the footer gives")
        }
        let manifest = try PackManifest.decode(bytes, path: path)
        try manifest.validate(dataEnd: footer.manifestOffset, path: path)
        self.manifest = manifest
        compression = try PackCompression()
    }

    /// The part named `name`, or an error saying the pack has none.
    public func part(_ name: String) throws(SwiftletError) -> PackPart {
        guard let part = manifest.part(named: name) else {
            throw SwiftletError(.invalidFormat, "\(path) has no part \(name), which a \(manifest.kind.rawValue) pack needs")
        }
        return part
    }

    /// Checks that `part`'s digest is the digest of its chunks' digests, as the manifest gives
    /// them (no chunk is read): for a part read a chunk at a time, whose chunks are then checked
    /// one by one as they are read.
    public func checkChunkDigests(of part: PackPart) throws(SwiftletError) {
        var whole = SHA256()
        for (index, chunk) in part.chunks.enumerated() {
            whole.update(chunk.encoding == .zero ? PackPart.zeroChunkDigest(length: part.length(ofChunk: index)) : chunk.sha256)
        }
        guard whole.finalize() == part.sha256 else {
            throw SwiftletError(.invalidFormat, "part \(part.name) of \(path) is damaged: its SHA-256 is not that of its chunks")
        }
    }

    /// Reads chunk `index` of `part` into `buffer` (exactly `part.length(ofChunk: index)` bytes)
    /// and checks it against its digest.
    public func readChunk(_ index: Int, of part: PackPart, into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) {
        precondition(buffer.count == part.length(ofChunk: index))
        let chunk = part.chunks[index]
        let what = "chunk \(index) of part \(part.name) of \(path)"
        switch chunk.encoding {
        case .zero:
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        case .raw:
            try file.read(into: buffer, at: start + chunk.offset, what: what)
        case .zstd:
            let stored = try file.read(count: Int(chunk.length), at: start + chunk.offset, what: what)
            let compression = self.compression
            try stored.withBytes { source throws(SwiftletError) in try compression.decompress(source, into: buffer, what: what) }
        }
        var digest = SHA256()
        digest.update(UnsafeRawBufferPointer(buffer))
        guard digest.finalize() == chunk.sha256 else {
            throw SwiftletError(.invalidFormat, "\(what) is damaged: its contents do not match their SHA-256")
        }
    }

    /// Writes `part`'s contents into `output`, an empty regular file (chunks of zeros become
    /// holes), checking every chunk and then the whole part against their digests. On an error
    /// the file holds an unknown prefix: the caller removes it.
    public func extract(_ part: PackPart, to output: borrowing OwnedFileDescriptor) throws(SwiftletError) {
        try OwnedFileDescriptor.truncate(fd: output.rawValue, to: part.size, what: "the \(part.name) of \(path)")
        let fd = output.rawValue
        try forEachStoredChunk(of: part) { index, contents throws(SwiftletError) in
            try OwnedFileDescriptor.write(fd: fd, from: contents, at: UInt64(index) * UInt64(part.chunkSize), what: "the \(part.name) of \(path)")
        }
    }

    /// Reads and checks every chunk of every part and each part's digest; writes nothing.
    /// Returns the bytes of contents checked.
    public func verify() throws(SwiftletError) -> UInt64 {
        var total: UInt64 = 0
        for part in manifest.parts {
            try forEachStoredChunk(of: part) { _, _ in }
            total += part.size
        }
        return total
    }

    /// Reads `part`'s stored chunks in order, each checked, hands each to `body`, and checks the
    /// part's digest (chunks of zeros are not read: their digest is known).
    private func forEachStoredChunk(of part: PackPart, _ body: (Int, UnsafeRawBufferPointer) throws(SwiftletError) -> Void) throws(SwiftletError) {
        var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(part.chunkSize), part.size)))
        var whole = SHA256()
        for (index, chunk) in part.chunks.enumerated() {
            let length = part.length(ofChunk: index)
            guard chunk.encoding != .zero else {
                whole.update(PackPart.zeroChunkDigest(length: length))
                continue
            }
            try buffer.withMutableBytes { raw throws(SwiftletError) in
                let contents = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
                try readChunk(index, of: part, into: contents)
                try body(index, UnsafeRawBufferPointer(contents))
            }
            whole.update(chunk.sha256)
        }
        guard whole.finalize() == part.sha256 else {
            throw SwiftletError(.invalidFormat, "part \(part.name) of \(path) is damaged: its chunks do not match its SHA-256")
        }
    }
}
