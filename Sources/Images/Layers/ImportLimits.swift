import Glibc
import SwiftletSystem

/// What one layer import (tar stream to EROFS image) may use, so that a hostile layer is refused
/// with a clear error before it exhausts memory or disk. Every layer is untrusted input: sizes,
/// names and counts in it are checked against these bounds as they are read.
public struct ImportLimits: Sendable, Equatable {
    /// Uncompressed bytes one layer stream may yield (a decompression bomb stops here). Default
    /// 64 GiB; `SWIFTLET_MAX_LAYER_SIZE` (bytes, or with a K, M, G or T suffix) changes it.
    public var maxLayerBytes: UInt64 = 64 << 30
    /// Entries (files, directories, links, whiteouts) in one image.
    public var maxEntries = 1 << 20
    /// Bytes of metadata kept in memory while an image is built: names, symlink targets, small
    /// file data, extended attributes, plus a fixed cost per entry.
    public var maxMetadataBytes: UInt64 = 1 << 30
    /// PAX and GNU long-name bytes before one entry.
    public var maxHeaderBytes = 1 << 20
    /// An entry's path, and each of its components (Linux's PATH_MAX and NAME_MAX).
    public var maxPathBytes = 4096
    public var maxNameBytes = 255
    /// Directories an entry may sit below.
    public var maxDepth = 512
    /// Free space left on the store's file system after a layer's data is written.
    public var reserveBytes: UInt64 = 256 << 20

    public init() {}

    /// The defaults, with `SWIFTLET_MAX_LAYER_SIZE` applied when it is set (and valid).
    public static var current: ImportLimits {
        var limits = ImportLimits()
        if let text = getenv("SWIFTLET_MAX_LAYER_SIZE").map({ String(cString: $0) }), let bytes = parseSize(text) {
            limits.maxLayerBytes = bytes
        }
        return limits
    }

    /// "1073741824", "64G", "512M": bytes, nil if malformed or overflowing.
    static func parseSize(_ text: String) -> UInt64? {
        var digits = Substring(text)
        var shift: UInt64 = 0
        switch digits.last?.uppercased() {
        case "K": shift = 10
        case "M": shift = 20
        case "G": shift = 30
        case "T": shift = 40
        default: break
        }
        if shift > 0 { digits = digits.dropLast() }
        guard let value = UInt64(digits), value > 0, value <= UInt64.max >> shift else { return nil }
        return value << shift
    }

    /// Throws unless the file system holding `fd` has room for `bytes` more plus the reserve.
    func requireSpace(_ bytes: UInt64, fd: Int32, what: String) throws(SwiftletError) {
        let available = try OwnedFileDescriptor.availableBytes(fd: fd)
        let (needed, overflow) = bytes.addingReportingOverflow(reserveBytes)
        guard !overflow, needed <= available else {
            throw SwiftletError(.systemCall, "not enough free space for \(what): it needs \(bytes) bytes and the file system has \(available) (Swiftlet keeps \(reserveBytes >> 20) MiB free)")
        }
    }
}
