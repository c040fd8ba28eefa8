import CCompression
import SwiftletSystem

/// zstd for one chunk at a time (the system's libzstd): each chunk is a frame of its own, so any
/// chunk can be read alone.
final class PackCompression {
    /// zstd's level: 3 is its default, fast to write and quick to read.
    static let level: Int32 = 3

    private let compressor: OpaquePointer
    private let decompressor: OpaquePointer

    init() throws(SwiftletError) {
        guard let compressor = ZSTD_createCCtx() else { throw SwiftletError(.systemCall, "cannot start a zstd compressor") }
        guard let decompressor = ZSTD_createDCtx() else {
            ZSTD_freeCCtx(compressor)
            throw SwiftletError(.systemCall, "cannot start a zstd decompressor")
        }
        self.compressor = compressor
        self.decompressor = decompressor
    }

    deinit {
        ZSTD_freeCCtx(compressor)
        ZSTD_freeDCtx(decompressor)
    }

    /// The most bytes zstd makes of `count` bytes.
    static func largestCompressedSize(of count: Int) -> Int { ZSTD_compressBound(count) }

    /// `source` compressed into `destination` (at least `largestCompressedSize(of: source.count)`
    /// bytes); returns the compressed length.
    func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        let result = ZSTD_compressCCtx(compressor, destination.baseAddress, destination.count, source.baseAddress, source.count, Self.level)
        guard ZSTD_isError(result) == 0 else {
            throw SwiftletError(.systemCall, "zstd cannot compress a chunk: \(String(cString: ZSTD_getErrorName(result)))")
        }
        return result
    }

    /// Decompresses the frame `source` into `destination`, which it must fill exactly; `what`
    /// names the chunk in errors.
    func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer, what: String) throws(SwiftletError) {
        let result = ZSTD_decompressDCtx(decompressor, destination.baseAddress, destination.count, source.baseAddress, source.count)
        guard ZSTD_isError(result) == 0 else {
            throw SwiftletError(.invalidFormat, "\(what) is damaged: zstd: \(String(cString: ZSTD_getErrorName(result)))")
        }
        guard result == destination.count else {
            throw SwiftletError(.invalidFormat, "\(what) is damaged: it holds \(result) bytes, not \(destination.count)")
        }
    }
}
