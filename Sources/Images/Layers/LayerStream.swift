import CCompression
import Glibc
import SwiftletSystem

/// How a layer blob is compressed; recognised by its leading bytes, whatever the media type claims.
public enum LayerCompression: String, Sendable, Codable {
    case none, gzip, zstd

    public init(magic: [UInt8]) {
        if magic.starts(with: [0x1f, 0x8b]) { self = .gzip }
        else if magic.starts(with: [0x28, 0xb5, 0x2f, 0xfd]) { self = .zstd }
        else { self = .none }
    }
}

/// Reads a layer blob from a file as its uncompressed tar stream (gzip, zstd or plain), and hashes
/// what it yields, so the caller can check the layer's uncompressed digest (its OCI diff ID).
/// A stream that yields more than `limit` bytes (a decompression bomb) fails at that point.
public final class LayerStream {
    public let compression: LayerCompression
    public let limit: UInt64
    public private(set) var produced: UInt64 = 0
    private let fd: OwnedFileDescriptor
    private let path: String
    private var input = [UInt8](repeating: 0, count: 1 << 17)
    private var inputStart = 0, inputEnd = 0
    private var inputEOF = false
    private var finished = false
    private var hasher = SHA256()
    private var zlib: UnsafeMutablePointer<z_stream>?
    private var zstd: OpaquePointer?

    public init(path: String, limit: UInt64 = ImportLimits().maxLayerBytes) throws(SwiftletError) {
        self.path = path
        self.limit = limit
        fd = try OwnedFileDescriptor.openInput(path, role: "layer")
        let magic = try fd.size() >= 4 ? try fd.read(count: 4, at: 0, what: "layer \(path)") : []
        compression = LayerCompression(magic: magic)
        switch compression {
        case .none: break
        case .gzip:
            let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            stream.initialize(to: z_stream())
            // 15 + 32: a 32 KiB window, and accept a gzip (or zlib) header.
            guard swiftlet_inflate_init(stream, 15 + 32) == Z_OK else {
                stream.deallocate()
                throw SwiftletError(.systemCall, "cannot start a gzip decoder for layer \(path)")
            }
            zlib = stream
        case .zstd:
            guard let context = ZSTD_createDCtx() else { throw SwiftletError(.systemCall, "cannot start a zstd decoder for layer \(path)") }
            zstd = context
        }
    }

    deinit {
        if let zlib { inflateEnd(zlib); zlib.deinitialize(count: 1); zlib.deallocate() }
        if let zstd { ZSTD_freeDCtx(zstd) }
    }

    /// The digest of everything read so far; after the end of the stream, the layer's diff ID.
    public func uncompressedDigest() -> Digest {
        var copy = hasher
        return Digest(bytes: copy.finalize())
    }

    /// Fills `buffer` with uncompressed bytes; returns how many, 0 at the end of the layer.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        guard !finished, buffer.count > 0 else { return 0 }
        var produced = 0
        switch compression {
        case .none:
            let fd = fd.rawValue
            produced = try systemCall("cannot read layer \(path)") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
            if produced == 0 { finished = true }
        case .gzip:
            produced = try inflate(into: buffer)
        case .zstd:
            produced = try decompressZstd(into: buffer)
        }
        guard UInt64(produced) <= limit - self.produced else {
            throw SwiftletError(.invalidFormat, "layer \(path) unpacks to more than \(limit) bytes, the most a layer may hold (SWIFTLET_MAX_LAYER_SIZE raises it)")
        }
        self.produced += UInt64(produced)
        hasher.update(UnsafeRawBufferPointer(rebasing: buffer[..<produced]))
        return produced
    }

    /// Reads more compressed input when what was read is used up; false at the end of the file.
    private func refill() throws(SwiftletError) -> Bool {
        if inputStart < inputEnd { return true }
        if inputEOF { return false }
        let fd = fd.rawValue
        let n = try input.withMutableBytes { raw throws(SwiftletError) in
            try systemCall("cannot read layer \(path)") { Glibc.read(fd, raw.baseAddress, raw.count) }
        }
        inputStart = 0; inputEnd = n
        if n == 0 { inputEOF = true }
        return n > 0
    }

    private var inputExhausted: Bool { inputEOF && inputStart == inputEnd }

    private func truncated() -> SwiftletError {
        SwiftletError(.invalidFormat, "layer \(path) is truncated: its \(compression.rawValue) stream ends early")
    }

    private func inflate(into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        let stream = zlib!
        while true {
            _ = try refill()
            let (status, consumed, produced) = input.withUnsafeMutableBytes { raw in
                stream.pointee.next_in = raw.baseAddress!.advanced(by: inputStart).assumingMemoryBound(to: Bytef.self)
                stream.pointee.avail_in = uInt(inputEnd - inputStart)
                stream.pointee.next_out = buffer.baseAddress!.assumingMemoryBound(to: Bytef.self)
                stream.pointee.avail_out = uInt(buffer.count)
                let status = CCompression.inflate(stream, Z_NO_FLUSH)
                return (status, inputEnd - inputStart - Int(stream.pointee.avail_in), buffer.count - Int(stream.pointee.avail_out))
            }
            inputStart += consumed
            switch status {
            case Z_STREAM_END:
                // Concatenated gzip members (pigz writes them) continue the stream.
                if try refill() { inflateReset(stream) } else { finished = true }
                if produced > 0 || finished { return produced }
            case Z_OK, Z_BUF_ERROR:
                if produced > 0 { return produced }
                if inputExhausted { throw truncated() }
            default:
                let reason = stream.pointee.msg.map { String(cString: $0) } ?? "status \(status)"
                throw SwiftletError(.invalidFormat, "layer \(path) is corrupt: gzip: \(reason)")
            }
        }
    }

    private func decompressZstd(into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        while true {
            _ = try refill()
            let hadInput = inputStart < inputEnd
            var inBuffer = ZSTD_inBuffer(src: nil, size: inputEnd, pos: inputStart)
            var outBuffer = ZSTD_outBuffer(dst: buffer.baseAddress, size: buffer.count, pos: 0)
            let result = input.withUnsafeBytes { raw in
                inBuffer.src = raw.baseAddress
                return ZSTD_decompressStream(zstd, &outBuffer, &inBuffer)
            }
            if ZSTD_isError(result) != 0 {
                throw SwiftletError(.invalidFormat, "layer \(path) is corrupt: zstd: \(String(cString: ZSTD_getErrorName(result)))")
            }
            inputStart = inBuffer.pos
            // 0: a frame is complete and flushed; another frame may follow. A call with no input
            // that produced nothing says only what the next frame would need.
            if hadInput || outBuffer.pos > 0 { zstdFrameOpen = result != 0 }
            if outBuffer.pos > 0 { return outBuffer.pos }
            if inputExhausted {
                if zstdFrameOpen { throw truncated() }
                finished = true
                return 0
            }
        }
    }
    private var zstdFrameOpen = true
}
