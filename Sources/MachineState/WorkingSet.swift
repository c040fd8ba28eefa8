import SwiftletSystem

/// The pages of a snapshot's memory that a restored guest wrote in its first run (its write
/// working set), kept beside the snapshot as a hint: a later restore makes private copies of them
/// before the guest runs, in one pass, instead of taking a copy-on-write fault for each.
///
/// A hint, never state: a restore without it, or with one that does not belong to the snapshot,
/// works the same, only slower. File format (little-endian; see docs/snapshot-format.md):
///
///     0   8  magic "SWLTWSET"
///     8   4  format version (1)
///     12  16 snapshot ID
///     28  8  guest pages (4 KiB) the snapshot's memory has
///     36  4  number of runs
///     40  32 SHA-256 of the runs
///     72  16 per run: first page (8), page count (8), sorted, apart
public struct WorkingSet: Sendable, Equatable {
    public static let magic: [UInt8] = Array("SWLTWSET".utf8)
    public static let version: UInt32 = 1
    public static let headerSize = 72
    /// The file's name in a snapshot directory.
    public static let fileName = "working-set"

    public let snapshot: SnapshotID
    public let pageCount: Int
    public let runs: [Range<Int>]

    /// `runs` must be sorted, apart and inside `pageCount` pages.
    public init(snapshot: SnapshotID, pageCount: Int, runs: [Range<Int>]) throws(SwiftletError) {
        var end = 0
        for run in runs {
            guard !run.isEmpty, run.lowerBound >= end, run.upperBound <= pageCount else {
                throw SwiftletError(.invalidFormat, "working-set runs must be sorted, apart and inside the \(pageCount) pages of guest memory")
            }
            end = run.upperBound + 1
        }
        self.snapshot = snapshot
        self.pageCount = pageCount
        self.runs = runs
    }

    /// Pages in the set.
    public var pages: Int { runs.reduce(0) { $0 + $1.count } }

    public func encode() -> [UInt8] {
        var body: [UInt8] = []
        body.reserveCapacity(runs.count * 16)
        for run in runs { body += LittleEndian.bytes(UInt64(run.lowerBound), 8) + LittleEndian.bytes(UInt64(run.count), 8) }
        var header = Self.magic + LittleEndian.bytes(UInt64(Self.version), 4) + snapshot.bytes
        header += LittleEndian.bytes(UInt64(pageCount), 8) + LittleEndian.bytes(UInt64(runs.count), 4) + SHA256.hash(body)
        return header + body
    }

    /// Reads a working-set file's bytes; `path` names it in errors. Refuses anything malformed, and
    /// a set taken from another snapshot or for another memory size.
    public static func decode(_ bytes: [UInt8], path: String, snapshot: SnapshotID, pageCount: Int) throws(SwiftletError) -> WorkingSet {
        guard bytes.count >= headerSize, Array(bytes[0..<8]) == magic else {
            throw SwiftletError(.invalidFormat, "\(path) is not a Swiftlet working-set file")
        }
        let version = UInt32(LittleEndian.read(bytes, at: 8, count: 4))
        guard version == Self.version else {
            throw SwiftletError(.unsupported, "\(path) is working-set format version \(version); this Swiftlet reads version \(Self.version)")
        }
        guard Array(bytes[12..<28]) == snapshot.bytes else {
            throw SwiftletError(.invalidFormat, "\(path) belongs to another snapshot than the one beside it")
        }
        let pages = LittleEndian.read(bytes, at: 28, count: 8), count = LittleEndian.read(bytes, at: 36, count: 4)
        guard pages == UInt64(pageCount) else {
            throw SwiftletError(.invalidFormat, "\(path) describes \(pages) pages of guest memory; the snapshot has \(pageCount)")
        }
        guard UInt64(bytes.count - headerSize) == count * 16 else {
            throw SwiftletError(.invalidFormat, "\(path) is truncated or padded: it announces \(count) runs")
        }
        let body = Array(bytes[headerSize...])
        guard SHA256.hash(body) == Array(bytes[40..<72]) else {
            throw SwiftletError(.invalidFormat, "\(path) is corrupt: its checksum does not match its contents")
        }
        var runs: [Range<Int>] = []
        runs.reserveCapacity(Int(count))
        for i in 0..<Int(count) {
            let first = LittleEndian.read(bytes, at: headerSize + i * 16, count: 8), length = LittleEndian.read(bytes, at: headerSize + i * 16 + 8, count: 8)
            guard first <= pages, length <= pages - first else {
                throw SwiftletError(.invalidFormat, "\(path) names pages outside guest memory")
            }
            runs.append(Int(first)..<Int(first + length))
        }
        do {
            return try WorkingSet(snapshot: snapshot, pageCount: pageCount, runs: runs)
        } catch {
            throw SwiftletError(.invalidFormat, "\(path): \(error.message)")
        }
    }
}
