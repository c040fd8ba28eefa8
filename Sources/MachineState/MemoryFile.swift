import Glibc
import GuestMemory
import SwiftletSystem

/// The snapshot memory file: a header page, then (for a diff) a bitmap of the pages it holds, then
/// guest memory region after region, page-aligned, so that a restore can map it copy-on-write.
/// See docs/snapshot-format.md.
///
/// A full file holds every page; pages that were zero are holes (the file is sparse), which read
/// back as zero. A diff file holds only the pages its bitmap marks; the others come from its parent.
public struct MemoryFile: Sendable {
    public enum Kind: UInt32, Sendable, Codable {
        case full = 0
        case diff = 1
    }

    public static let magic: [UInt8] = Array("SWLTMEM\0".utf8)
    public static let version: UInt32 = 1
    public static let pageSize: UInt64 = 4096
    static let maximumRegions = 64

    public var kind: Kind
    /// Ties the memory file to its state file (and a diff to its parent).
    public var id: SnapshotID
    public var parent: SnapshotID?
    /// Guest-physical regions, in file order.
    public var regions: [(start: GuestAddress, size: UInt64)]
    /// Where region data starts, and the bitmap of present pages for a diff (one bit per page over
    /// all regions in order).
    public var dataOffset: UInt64
    public var bitmapOffset: UInt64
    public var bitmapBytes: UInt64

    public var dataBytes: UInt64 { regions.reduce(0) { $0 + $1.size } }
    public var fileBytes: UInt64 { dataOffset + dataBytes }
    public var pageCount: Int { Int(dataBytes / Self.pageSize) }

    init(kind: Kind, id: SnapshotID, parent: SnapshotID?, regions: [(start: GuestAddress, size: UInt64)]) {
        self.kind = kind
        self.id = id
        self.parent = parent
        self.regions = regions
        let pages = regions.reduce(0) { $0 + $1.size } / Self.pageSize
        bitmapOffset = kind == .diff ? Self.pageSize : 0
        bitmapBytes = kind == .diff ? (pages + 63) / 64 * 8 : 0
        dataOffset = Self.pageSize + (bitmapBytes + Self.pageSize - 1) / Self.pageSize * Self.pageSize
    }

    /// A full memory file of `regions` for the snapshot `id` (its contents written by the caller).
    public static func full(id: SnapshotID, regions: [(start: GuestAddress, size: UInt64)]) -> MemoryFile {
        MemoryFile(kind: .full, id: id, parent: nil, regions: regions)
    }

    /// The file's first page.
    public var header: [UInt8] {
        var h = Self.magic
        h += LittleEndian.bytes(UInt64(Self.version), 4) + LittleEndian.bytes(UInt64(kind.rawValue), 4) + id.bytes + (parent ?? .zero).bytes
        h += LittleEndian.bytes(Self.pageSize, 4) + LittleEndian.bytes(UInt64(regions.count), 4)
        for field in [bitmapOffset, bitmapBytes, dataOffset, dataBytes, fileBytes] { h += LittleEndian.bytes(field, 8) }
        for region in regions { h += LittleEndian.bytes(region.start.rawValue, 8) + LittleEndian.bytes(region.size, 8) }
        return h + [UInt8](repeating: 0, count: Int(Self.pageSize) - h.count)
    }

    /// Reads and checks the header of `path`, and that the file is as long as it says.
    public static func read(_ path: String) throws(SwiftletError) -> MemoryFile {
        try open(path).file
    }

    /// A memory file whose header has been checked, and its open descriptor.
    public struct Opened: ~Copyable {
        public let file: MemoryFile
        public let descriptor: OwnedFileDescriptor
    }

    /// Opens `path` and checks its header, and that the file is as long as it says.
    public static func open(_ path: String) throws(SwiftletError) -> Opened {
        let fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY, what: "snapshot memory file")
        let size = try fd.size()
        guard size >= pageSize else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet snapshot memory file (\(size) bytes)")
        }
        let h = try fd.read(count: Int(pageSize), at: 0, what: path)
        return Opened(file: try parse(header: h, size: size, path: path), descriptor: fd)
    }

    /// The memory file whose first page is `h` and whose size is `size`, checked as `open`
    /// checks a file's (for a memory file that is not a file: a pack's memory part). `path`
    /// names it in errors.
    public static func parse(header h: [UInt8], size: UInt64, path: String) throws(SwiftletError) -> MemoryFile {
        guard h.count >= Int(pageSize), Array(h[0..<8]) == magic else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet snapshot memory file")
        }
        let version = UInt32(LittleEndian.read(h, at: 8, count: 4))
        guard version == Self.version else {
            throw SwiftletError(.unsupported, "\(path) is memory file format version \(version); this Swiftlet reads version \(Self.version) only")
        }
        guard let kind = Kind(rawValue: UInt32(LittleEndian.read(h, at: 12, count: 4))), LittleEndian.read(h, at: 48, count: 4) == pageSize else {
            throw SwiftletError(.invalidFormat, "\(path) has a memory file header this Swiftlet does not understand")
        }
        let count = Int(LittleEndian.read(h, at: 52, count: 4))
        guard count > 0, count <= maximumRegions else {
            throw SwiftletError(.invalidFormat, "\(path) declares \(count) memory regions")
        }
        var regions: [(start: GuestAddress, size: UInt64)] = []
        // The header is untrusted: every sum below is checked, so a crafted one is refused, never a trap.
        var total: UInt64 = 0
        for i in 0..<count {
            let start = LittleEndian.read(h, at: 96 + 16 * i, count: 8), length = LittleEndian.read(h, at: 104 + 16 * i, count: 8)
            guard start % pageSize == 0, length % pageSize == 0, length > 0 else {
                throw SwiftletError(.invalidFormat, "\(path) declares a memory region that is not page-aligned")
            }
            let (_, endOverflow) = start.addingReportingOverflow(length)
            let (sum, totalOverflow) = total.addingReportingOverflow(length)
            // The data follows a header page and a bitmap of at most total/2^15 bytes: keep room for them.
            guard !endOverflow, !totalOverflow, sum <= UInt64(Int64.max) / 2 else {
                throw SwiftletError(.invalidFormat, "\(path) declares memory regions whose addresses or sizes overflow")
            }
            if let previous = regions.last, start < previous.start.rawValue + previous.size {
                throw SwiftletError(.invalidFormat, "\(path) declares memory regions that overlap or are out of order")
            }
            total = sum
            regions.append((GuestAddress(start), length))
        }
        let parentBytes = Array(h[32..<48])
        let file = MemoryFile(kind: kind, id: SnapshotID(bytes: Array(h[16..<32])),
                              parent: parentBytes.allSatisfy { $0 == 0 } ? nil : SnapshotID(bytes: parentBytes), regions: regions)
        let declared = [56, 64, 72, 88].map { LittleEndian.read(h, at: $0, count: 8) }
        guard declared == [file.bitmapOffset, file.bitmapBytes, file.dataOffset, file.fileBytes] else {
            throw SwiftletError(.invalidFormat, "\(path) has an inconsistent memory file header")
        }
        guard size == file.fileBytes else {
            throw SwiftletError(.invalidFormat, "\(path) is \(size < file.fileBytes ? "truncated" : "longer than its header says"): \(size) bytes, expected \(file.fileBytes)")
        }
        return file
    }

    /// The diff's bitmap of present pages.
    public func presentPages(_ fd: borrowing OwnedFileDescriptor) throws(SwiftletError) -> [UInt64] {
        guard kind == .diff else { return [UInt64](repeating: ~0, count: (pageCount + 63) / 64) }
        let bytes = try fd.read(count: Int(bitmapBytes), at: bitmapOffset, what: "snapshot memory bitmap")
        return stride(from: 0, to: bytes.count, by: 8).map { LittleEndian.read(bytes, at: $0, count: 8) }
    }
}

/// 16 random bytes naming one snapshot; its memory file and state file both carry it.
public struct SnapshotID: Sendable, Hashable, Codable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 16)
        self.bytes = bytes
    }

    public static func random() throws(SwiftletError) -> SnapshotID {
        var bytes = [UInt8](repeating: 0, count: 16)
        try bytes.withMutableBytes { b throws(SwiftletError) in try SystemRandom.fill(b) }
        return SnapshotID(bytes: bytes)
    }

    static let zero = SnapshotID(bytes: [UInt8](repeating: 0, count: 16))

    public var description: String { bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex, let next = text.index(index, offsetBy: 2, limitedBy: text.endIndex),
              let byte = UInt8(text[index..<next], radix: 16) {
            bytes.append(byte)
            index = next
        }
        guard bytes.count == 16, index == text.endIndex else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a snapshot id: \(text)"))
        }
        self.bytes = bytes
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
