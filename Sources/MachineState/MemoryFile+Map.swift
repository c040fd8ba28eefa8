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
        var specs: [GuestMemory.RegionSpec] = []
        var offset = base.dataOffset
        for region in base.regions {
            specs.append(.init(start: region.start, size: region.size, backing: .file(descriptor: opened.descriptor.rawValue, offset: offset, shared: false)))
            offset += region.size
        }
        // The mappings keep the file's pages reachable after its descriptor closes.
        let memory = try GuestMemory(specs)
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
