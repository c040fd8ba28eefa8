import Glibc
import GuestMemory
import SwiftletSystem

/// What writing a memory file cost.
public struct MemoryWriteStats: Sendable, Equatable {
    /// Pages of guest memory written (a full file skips zero pages, a diff writes dirty pages).
    public var pagesWritten: Int
    /// Bytes written, header and bitmap included.
    public var bytesWritten: UInt64
}

extension MemoryFile {
    /// Writes `memory` to a new file at `path` (which must not exist), and syncs it.
    ///
    /// `dirty` nil writes a full file: every page that is not all zeros. A `dirty` bitmap (one bit
    /// per page over all regions in order, as KVM's dirty log gives it) writes a diff of those pages
    /// only, on top of the snapshot `parent`. The guest must not run meanwhile.
    public static func write(_ memory: GuestMemory, to path: String, id: SnapshotID,
                             diffFrom parent: SnapshotID? = nil, dirty: [UInt64]? = nil) throws(SwiftletError) -> MemoryWriteStats {
        precondition((parent == nil) == (dirty == nil), "a diff needs both its parent and its dirty pages")
        guard memory.regions.count <= maximumRegions else {
            throw SwiftletError(.unsupported, "guest memory has \(memory.regions.count) regions; a snapshot holds at most \(maximumRegions)")
        }
        let file = MemoryFile(kind: dirty == nil ? .full : .diff, id: id, parent: parent,
                              regions: memory.regions.map { ($0.start, $0.size) })
        if let dirty, dirty.count < (file.pageCount + 63) / 64 {
            throw SwiftletError(.invalidArgument, "the dirty-page bitmap covers \(dirty.count * 64) pages; guest memory has \(file.pageCount)")
        }
        let fd = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot memory file")
        try systemCall("cannot size \(path)") { ftruncate(fd.rawValue, off_t(file.fileBytes)) }
        var stats = MemoryWriteStats(pagesWritten: 0, bytesWritten: pageSize)
        try fd.write(file.header, at: 0, what: path)
        if let dirty {
            let words = Array(dirty.prefix(Int(file.bitmapBytes / 8)))
            let bytes = words.flatMap { LittleEndian.bytes($0, 8) }
            try fd.write(bytes, at: file.bitmapOffset, what: path)
            stats.bytesWritten += UInt64(bytes.count)
        }

        var firstPage = 0 // of the region, in the whole-memory page numbering
        var fileOffset = file.dataOffset
        for region in memory.regions {
            let pages = Int(region.size / pageSize)
            var page = 0
            while page < pages {
                // One run of pages to write: consecutive dirty pages, or consecutive non-zero ones.
                guard Self.wanted(page: firstPage + page, region: region, index: page, dirty: dirty) else { page += 1; continue }
                var end = page + 1
                while end < pages && end - page < 256 && Self.wanted(page: firstPage + end, region: region, index: end, dirty: dirty) { end += 1 }
                // SAFETY: pages [page, end) lie inside the region's mapping.
                let run = UnsafeRawBufferPointer(start: region.hostAddress + page * Int(pageSize), count: (end - page) * Int(pageSize))
                try fd.write(from: run, at: fileOffset + UInt64(page) * pageSize, what: path)
                stats.pagesWritten += end - page
                stats.bytesWritten += UInt64(run.count)
                page = end
            }
            firstPage += pages
            fileOffset += region.size
        }
        try systemCall("cannot sync \(path)") { fsync(fd.rawValue) }
        return stats
    }

    private static func wanted(page: Int, region: GuestMemory.Region, index: Int, dirty: [UInt64]?) -> Bool {
        if let dirty { return dirty[page / 64] >> UInt64(page % 64) & 1 != 0 }
        // SAFETY: the page lies inside the region's mapping; the zero page is a page long.
        return !isZeroPage(region.hostAddress + index * Int(pageSize))
    }

    /// Whether the page of memory at `page` (a whole page the caller may read) holds only zeros.
    public static func isZeroPage(_ page: UnsafeRawPointer) -> Bool {
        memcmp(page, zeroPage, Int(pageSize)) == 0
    }

    /// A page of zeros to compare pages with (glibc's memcmp is vectorised, whatever the build).
    nonisolated(unsafe) private static let zeroPage: UnsafeMutableRawPointer = {
        let page = UnsafeMutableRawPointer.allocate(byteCount: Int(pageSize), alignment: Int(pageSize))
        page.initializeMemory(as: UInt8.self, repeating: 0, count: Int(pageSize))
        return page
    }()
}
