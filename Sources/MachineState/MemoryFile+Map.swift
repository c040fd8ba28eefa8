import Glibc
import GuestMemory
import SwiftletSystem

extension MemoryFile {
    /// A diff with more separate runs of pages than this is copied in rather than mapped (every
    /// mapping is a kernel VMA, and a process may have only about 65,000).
    static let maximumMappedRuns = 2048

    /// Guest memory for a restore, mapped copy-on-write from snapshot memory files: nothing is
    /// copied, pages load from the files on first touch, and guest writes never reach the files.
    ///
    /// `chain` is a full memory file followed by the diffs taken after it, in order; the last one
    /// must be `id`. Each diff's pages are mapped over its parent's.
    public static func map(chain: [String], id: SnapshotID) throws(SwiftletError) -> GuestMemory {
        guard let first = chain.first else { throw SwiftletError(.invalidArgument, "no snapshot memory file to restore") }
        let opened = try open(first)
        let base = opened.file
        guard base.kind == .full else {
            throw SwiftletError(.invalidFormat, "\(first) is a diff; a restore starts from a full snapshot")
        }
        // Pages the guest never wrote are holes in the file. Mapping them from the file would make
        // each first touch a page-cache fault plus a copy; anonymous memory is cheaper to fault in
        // and can use transparent huge pages. So guest memory is anonymous, with the file mapped
        // over every 2 MiB chunk that holds data.
        let memory = try GuestMemory(base.regions.map { GuestMemory.RegionSpec(start: $0.start, size: $0.size) })
        // A filesystem that cannot tell its holes: map all of it.
        let data = (try? opened.descriptor.dataRanges(size: base.fileBytes)) ?? [0..<base.fileBytes]
        var offset = base.dataOffset
        var runs: [(address: GuestAddress, offset: UInt64, length: UInt64)] = []
        for region in base.regions {
            for run in mappedRuns(data: data, regionOffset: offset, regionSize: region.size) {
                runs.append((GuestAddress(region.start.rawValue + run.lowerBound), offset + run.lowerBound, UInt64(run.count)))
            }
            offset += region.size
        }
        if runs.count > Self.maximumMappedRuns {
            offset = base.dataOffset
            runs = base.regions.map { region in
                defer { offset += region.size }
                return (region.start, offset, region.size)
            }
        }
        // The mappings keep the file's pages reachable after its descriptor closes.
        for run in runs {
            try memory.mapFile(opened.descriptor.rawValue, offset: run.offset, over: run.address, length: run.length)
        }
        var previous = base
        for path in chain.dropFirst() {
            let diffFile = try open(path)
            let diff = diffFile.file
            guard diff.kind == .diff, diff.parent == previous.id else {
                throw SwiftletError(.invalidFormat, "\(path) is not a diff of snapshot \(previous.id)")
            }
            guard diff.regions.map(\.start) == base.regions.map(\.start), diff.regions.map(\.size) == base.regions.map(\.size) else {
                throw SwiftletError(.invalidFormat, "\(path) describes a different memory layout than its parent")
            }
            try diff.apply(diffFile.descriptor, to: memory)
            previous = diff
        }
        guard previous.id == id else {
            throw SwiftletError(.invalidFormat, "the memory files belong to snapshot \(previous.id), not \(id): the state and memory files do not match")
        }
        return memory
    }

    /// Granularity of the file mappings of a full memory file: a transparent huge page.
    static let mappedChunk: UInt64 = 2 << 20

    /// The parts of a region (offsets from its start; it is `regionSize` bytes at `regionOffset`
    /// in the file) to map from the file: every `mappedChunk` that holds any of `data` (the file's
    /// data ranges, sorted), merged into runs. The rest of the region is holes.
    static func mappedRuns(data: [Range<UInt64>], regionOffset: UInt64, regionSize: UInt64) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for range in data {
            let start = max(range.lowerBound, regionOffset), end = min(range.upperBound, regionOffset + regionSize)
            guard start < end else { continue }
            let first = (start - regionOffset) / mappedChunk * mappedChunk
            let last = min(regionSize, (end - regionOffset + mappedChunk - 1) / mappedChunk * mappedChunk)
            runs.appendMerging(first..<last)
        }
        return runs
    }

    /// Puts this diff's pages over `memory`.
    func apply(_ fd: borrowing OwnedFileDescriptor, to memory: GuestMemory) throws(SwiftletError) {
        let present = try presentPages(fd)
        var runs: [(page: Int, count: Int)] = []
        var page = 0
        while page < pageCount {
            guard present[page / 64] >> UInt64(page % 64) & 1 != 0 else { page += 1; continue }
            var end = page + 1
            while end < pageCount && present[end / 64] >> UInt64(end % 64) & 1 != 0 { end += 1 }
            runs.append((page, end - page))
            page = end
        }
        let copy = runs.count > Self.maximumMappedRuns
        for run in runs {
            // Runs never cross regions: split them where one region ends.
            var first = run.page, remaining = run.count
            while remaining > 0 {
                let (address, fileOffset, inRegion) = locate(page: first)
                let count = min(remaining, inRegion)
                let length = UInt64(count) * Self.pageSize
                if copy {
                    _ = try memory.withBuffer(at: address, count: Int(length)) { (buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) in
                        try fd.read(into: buffer, at: fileOffset, what: "snapshot memory diff")
                    }.get()
                } else {
                    try memory.mapFile(fd.rawValue, offset: fileOffset, over: address, length: length)
                }
                first += count
                remaining -= count
            }
        }
    }

    /// Page `page` (numbered over all regions): its guest address, its file offset, and how many
    /// pages of its region follow it (itself included).
    func locate(page: Int) -> (GuestAddress, UInt64, Int) {
        var first = 0
        var offset = dataOffset
        for region in regions {
            let pages = Int(region.size / Self.pageSize)
            if page < first + pages {
                let index = UInt64(page - first)
                return (GuestAddress(region.start.rawValue + index * Self.pageSize), offset + index * Self.pageSize, first + pages - page)
            }
            first += pages
            offset += region.size
        }
        preconditionFailure("page \(page) is outside guest memory")
    }
}
