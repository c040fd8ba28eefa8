import SwiftletSystem

/// The fixed-size record at the very end of a pack (docs/pack-format.md): it says where the pack
/// starts (a pack may follow an executable), where its manifest is and what that manifest's
/// SHA-256 is. Everything else in the pack is reached through the manifest.
///
///     offset  size  field
///          0     8  magic "SWLTPACK"
///          8     4  format version (little-endian; 1)
///         12     4  flags (0; a reader refuses others)
///         16     8  pack length: bytes from the pack's first byte to the footer's last
///         24     8  manifest offset, from the pack's first byte
///         32     8  manifest length
///         40    32  the manifest's SHA-256
public struct PackFooter: Equatable, Sendable {
    public static let size = 72
    public static let magic: [UInt8] = Array("SWLTPACK".utf8)
    /// The format version this Swiftlet writes and reads.
    public static let currentVersion: UInt32 = 1
    /// A manifest larger than this is refused (a 1 TiB disk in 1 MiB chunks needs about 150 MiB;
    /// packs are far smaller in practice, and the bound keeps a hostile footer from making a reader
    /// allocate gigabytes).
    public static let maximumManifestLength: UInt64 = 256 << 20

    public var version: UInt32
    public var packLength: UInt64
    public var manifestOffset: UInt64
    public var manifestLength: UInt64
    public var manifestDigest: [UInt8]

    public init(packLength: UInt64, manifestOffset: UInt64, manifestLength: UInt64, manifestDigest: [UInt8]) {
        self.version = Self.currentVersion
        self.packLength = packLength
        self.manifestOffset = manifestOffset
        self.manifestLength = manifestLength
        self.manifestDigest = manifestDigest
    }

    public var bytes: [UInt8] {
        var bytes = Self.magic
        LittleEndian.append(UInt64(version), 4, to: &bytes)
        LittleEndian.append(0, 4, to: &bytes)
        LittleEndian.append(packLength, 8, to: &bytes)
        LittleEndian.append(manifestOffset, 8, to: &bytes)
        LittleEndian.append(manifestLength, 8, to: &bytes)
        bytes += manifestDigest
        return bytes
    }

    /// Reads and checks the footer of a file of `fileSize` bytes whose last `size` bytes are
    /// `bytes`: each refusal names the field and what was wrong, so a damaged, truncated, foreign
    /// or newer file gets a message that says so.
    public init(bytes: [UInt8], fileSize: UInt64, path: String) throws(SwiftletError) {
        guard bytes.count == Self.size, Array(bytes[0..<8]) == Self.magic else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet pack (no pack footer at its end: it is another kind of file, or a pack cut short)")
        }
        version = UInt32(LittleEndian.read(bytes, at: 8, count: 4))
        guard version == Self.currentVersion else {
            throw SwiftletError(.invalidFormat, version > Self.currentVersion
                ? "\(path) is a pack of format version \(version), made by a newer Swiftlet; this one reads version \(Self.currentVersion)"
                : "\(path) has a damaged pack footer: format version \(version) does not exist")
        }
        let flags = LittleEndian.read(bytes, at: 12, count: 4)
        guard flags == 0 else {
            throw SwiftletError(.invalidFormat, "\(path) has a damaged pack footer: unknown flags 0x\(String(flags, radix: 16))")
        }
        packLength = LittleEndian.read(bytes, at: 16, count: 8)
        manifestOffset = LittleEndian.read(bytes, at: 24, count: 8)
        manifestLength = LittleEndian.read(bytes, at: 32, count: 8)
        manifestDigest = Array(bytes[40..<72])
        // The manifest sits right before the footer, and the pack fits in the file.
        guard packLength >= UInt64(Self.size), packLength <= fileSize else {
            throw SwiftletError(.invalidFormat, "\(path) has a damaged pack footer: it gives the pack \(packLength) bytes, and the file has \(fileSize)")
        }
        guard manifestLength > 0, manifestLength <= Self.maximumManifestLength,
              case let (end, overflow) = manifestOffset.addingReportingOverflow(manifestLength), !overflow,
              end == packLength - UInt64(Self.size) else {
            throw SwiftletError(.invalidFormat, "\(path) has a damaged pack footer: a manifest of \(manifestLength) bytes at \(manifestOffset) does not end where the footer starts (\(packLength - UInt64(Self.size)))")
        }
    }

    /// Where the pack starts in a file of `fileSize` bytes (0, or the size of the executable it follows).
    public func packStart(fileSize: UInt64) -> UInt64 { fileSize - packLength }
}
