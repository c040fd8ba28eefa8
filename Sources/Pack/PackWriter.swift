import Hypervisor
import SwiftletDigest
import SwiftletSystem

/// Writes a pack in one pass (docs/pack-format.md): each part's chunks as they are read (zeros
/// and holes not stored, the rest zstd-compressed unless that does not pay), then the manifest
/// and the footer. The pack may start anywhere in the file (after an executable): every offset in
/// it is relative to `start`.
public final class PackWriter {
    /// Bytes per chunk: the unit a reader fetches, checks and (for memory) maps.
    public static let chunkSize: UInt32 = 1 << 20
    /// Stored chunks start at multiples of this, from the pack's start.
    public static let alignment: UInt64 = 4096

    private let fd: Int32
    private let start: UInt64
    /// The next free byte, from the pack's start.
    private var position: UInt64 = 0
    private var parts: [PackPart] = []
    private let compression: PackCompression
    private var chunk: [UInt8]
    private var compressed: [UInt8]

    /// A writer of a pack into the file `fd` (which it does not own), starting at byte `start`.
    public init(fd: Int32, start: UInt64 = 0) throws(SwiftletError) {
        self.fd = fd
        self.start = start
        self.compression = try PackCompression()
        self.chunk = [UInt8](repeating: 0, count: Int(Self.chunkSize))
        self.compressed = [UInt8](repeating: 0, count: PackCompression.largestCompressedSize(of: Int(Self.chunkSize)))
    }

    /// Adds a part holding the first `size` bytes of `source` (a regular file; its holes are not
    /// read). `what` names the source in errors.
    public func add(name: String, contentsOf source: borrowing OwnedFileDescriptor, size: UInt64, what: String) throws(SwiftletError) {
        let data = try source.dataRanges(size: size)
        var next = 0
        let fd = source.rawValue
        try addPart(name: name, size: size, mayHaveData: { range in
            while next < data.count && data[next].upperBound <= range.lowerBound { next += 1 }
            return next < data.count && data[next].lowerBound < range.upperBound
        }, read: { offset, buffer throws(SwiftletError) in
            try OwnedFileDescriptor.read(fd: fd, into: buffer, at: offset, what: what)
        })
    }

    /// Adds a part holding `bytes`.
    public func add(name: String, bytes: [UInt8]) throws(SwiftletError) {
        try addPart(name: name, size: UInt64(bytes.count), mayHaveData: { _ in true }, read: { offset, buffer in
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        })
    }

    private func addPart(name: String, size: UInt64, mayHaveData: (Range<UInt64>) -> Bool,
                         read: (UInt64, UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Void) throws(SwiftletError) {
        guard PackManifest.isPlainName(name), !parts.contains(where: { $0.name == name }) else {
            throw SwiftletError(.invalidArgument, "a pack cannot hold a part named \(name.debugDescription) (twice, or not a plain name)")
        }
        guard size <= PackManifest.maximumPartSize else {
            throw SwiftletError(.invalidArgument, "part \(name) has \(size) bytes, more than a pack holds (\(PackManifest.maximumPartSize))")
        }
        var whole = SHA256()
        var chunks: [PackChunk] = []
        var offset: UInt64 = 0
        while offset < size {
            let length = Int(min(UInt64(Self.chunkSize), size - offset))
            let range = offset..<offset + UInt64(length)
            var isZero = !mayHaveData(range)
            if !isZero {
                try chunk.withMutableBytes { buffer throws(SwiftletError) in
                    try read(offset, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]))
                }
                isZero = Self.allZero(chunk, count: length)
            }
            if isZero {
                whole.update(PackPart.zeroChunkDigest(length: length))
                chunks.append(.zero)
            } else {
                let stored = try store(length: length)
                whole.update(stored.sha256)
                chunks.append(stored)
            }
            offset += UInt64(length)
        }
        parts.append(PackPart(name: name, size: size, sha256: whole.finalize(), chunkSize: Self.chunkSize, chunks: chunks))
    }

    /// Stores the first `length` bytes of `chunk`, compressed if that saves space.
    private func store(length: Int) throws(SwiftletError) -> PackChunk {
        let compression = self.compression
        let (digest, compressedLength) = try chunk.withBytes { raw throws(SwiftletError) -> ([UInt8], Int) in
            let contents = UnsafeRawBufferPointer(rebasing: raw[0..<length])
            var own = SHA256()
            own.update(contents)
            let count = try compressed.withMutableBytes { out throws(SwiftletError) in try compression.compress(contents, into: out) }
            return (own.finalize(), count)
        }
        let offset = (position + Self.alignment - 1) / Self.alignment * Self.alignment
        let packed = compressedLength < length
        let stored = packed ? compressedLength : length
        let source = packed ? compressed : chunk
        let fd = self.fd, at = start + offset
        try source.withBytes { bytes throws(SwiftletError) in
            try OwnedFileDescriptor.write(fd: fd, from: UnsafeRawBufferPointer(rebasing: bytes[0..<stored]), at: at, what: "the pack")
        }
        position = offset + UInt64(stored)
        return PackChunk(encoding: packed ? .zstd : .raw, offset: offset, length: UInt64(stored), sha256: digest)
    }

    static func allZero(_ bytes: [UInt8], count: Int) -> Bool {
        bytes.withUnsafeBytes { raw in
            let words = count / 8
            let wordsZero = raw.withMemoryRebound(to: UInt64.self) { w in
                var any: UInt64 = 0
                for i in 0..<words { any |= w[i] }
                return any == 0
            }
            guard wordsZero else { return false }
            for i in words * 8..<count where raw[i] != 0 { return false }
            return true
        }
    }

    /// Writes the manifest and the footer; returns the manifest and the pack's length (from
    /// `start` to the end of the file). The writer cannot be used afterwards.
    public func finish(kind: PackManifest.Kind, createdBy: String, cpu: CPUContract? = nil) throws(SwiftletError) -> (manifest: PackManifest, packLength: UInt64) {
        let manifest = PackManifest(kind: kind, createdBy: createdBy, parts: parts, cpu: cpu)
        let bytes = try manifest.encoded()
        let manifestOffset = position
        let packLength = manifestOffset + UInt64(bytes.count) + UInt64(PackFooter.size)
        let footer = PackFooter(packLength: packLength, manifestOffset: manifestOffset, manifestLength: UInt64(bytes.count),
                                manifestDigest: SHA256.hash(bytes))
        let fd = self.fd
        try (bytes + footer.bytes).withBytes { b throws(SwiftletError) in
            try OwnedFileDescriptor.write(fd: fd, from: b, at: start + manifestOffset, what: "the pack")
        }
        position = packLength
        return (manifest, packLength)
    }
}
