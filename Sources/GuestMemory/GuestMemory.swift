import CLinux
import Glibc
import Synchronization
import SwiftletSystem

/// A guest's physical memory: a few non-overlapping regions with bounds-checked, little-endian access.
///
/// The regions never move for the life of the object, so vCPU threads and devices may access guest
/// memory concurrently, exactly as the guest's own CPUs do; ordering is the guest's business.
public final class GuestMemory: @unchecked Sendable {
    // SAFETY (Sendable): the region list and mappings are immutable after init; the bytes are shared memory.
    public let regions: [Region]
    private let owners: [MappingOwner]
    /// Pages written by the VMM (devices) since the last `takeWrittenPages`, when tracking: one
    /// bit per page over all regions in order. KVM's dirty log sees only the guest's own writes.
    private let writeLog: UnsafeMutablePointer<UInt64>
    private let writeLogWords: Int
    private let firstPage: [Int]
    private let tracking = Atomic<Bool>(false)

    /// Where a region lives, for callers that register memory with a hypervisor.
    public struct Region: Sendable, Equatable {
        public let start: GuestAddress
        public let size: UInt64
        // SAFETY (Sendable): the pointer stays valid while the GuestMemory that made this value lives.
        public nonisolated(unsafe) let hostAddress: UnsafeMutableRawPointer
        public var end: UInt64 { start.rawValue + size }

        public init(start: GuestAddress, size: UInt64, hostAddress: UnsafeMutableRawPointer) {
            self.start = start
            self.size = size
            self.hostAddress = hostAddress
        }
    }

    /// How to back one region of guest memory.
    public struct RegionSpec: Sendable {
        public enum Backing: Sendable {
            /// Zero-filled anonymous memory.
            case anonymous
            /// A file's bytes from `offset`; `shared: false` is a lazy copy-on-write view.
            case file(descriptor: Int32, offset: UInt64, shared: Bool)
        }
        public var start: GuestAddress
        public var size: UInt64
        public var backing: Backing

        public init(start: GuestAddress, size: UInt64, backing: Backing = .anonymous) {
            self.start = start
            self.size = size
            self.backing = backing
        }
    }

    private final class MappingOwner: Sendable {
        let mapping: MemoryMapping
        init(_ mapping: consuming MemoryMapping) { self.mapping = mapping }
    }

    /// Maps every region of `specs`, which must not overlap and must be page-aligned.
    public init(_ specs: [RegionSpec]) throws(SwiftletError) {
        let sorted = specs.sorted { $0.start < $1.start }
        for spec in sorted where spec.size == 0 || spec.size % 4096 != 0 || spec.start.rawValue % 4096 != 0 {
            throw SwiftletError(.invalidArgument, "guest memory region at \(spec.start) of \(spec.size) bytes is not page-aligned")
        }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.start.rawValue + a.size > b.start.rawValue {
            throw SwiftletError(.invalidArgument, "guest memory regions overlap at \(b.start)")
        }
        var owners: [MappingOwner] = []
        var regions: [Region] = []
        for spec in sorted {
            let mapping: MemoryMapping
            switch spec.backing {
            case .anonymous:
                // 2 MiB-aligned and THP-advised, so guest-physical 2 MiB pages line up with host ones.
                mapping = try MemoryMapping.anonymous(size: Int(spec.size), alignment: Self.hugePageSize, transparentHugePages: true)
            case .file(let fd, let offset, let shared):
                mapping = try MemoryMapping.file(fd: fd, size: Int(spec.size), offset: offset, writable: true, shared: shared)
            }
            regions.append(Region(start: spec.start, size: spec.size, hostAddress: mapping.base))
            owners.append(MappingOwner(mapping))
        }
        self.regions = regions
        self.owners = owners
        var first: [Int] = []
        var pages = 0
        for region in regions {
            first.append(pages)
            pages += Int(region.size / Self.pageSize)
        }
        firstPage = first
        writeLogWords = (pages + 63) / 64
        writeLog = .allocate(capacity: max(1, writeLogWords))
        writeLog.initialize(repeating: 0, count: max(1, writeLogWords))
    }

    deinit { writeLog.deallocate() }

    /// Starts recording which pages the VMM writes (for diff snapshots).
    public func startTrackingWrites() {
        tracking.store(true, ordering: .releasing)
    }

    /// The pages written through this object since tracking started or since the last call (one
    /// bit per page over all regions in order), and clears the record.
    public func takeWrittenPages() -> [UInt64] {
        (0..<writeLogWords).map { swiftlet_atomic_take_u64(writeLog + $0) }
    }

    private func recordWrite(region index: Int, offset: UInt64, length: UInt64) {
        guard length > 0, tracking.load(ordering: .relaxed) else { return }
        let first = firstPage[index] + Int(offset / Self.pageSize)
        let last = firstPage[index] + Int((offset + length - 1) / Self.pageSize)
        for page in first...last {
            swiftlet_atomic_or_u64(writeLog + page / 64, 1 << UInt64(page % 64))
        }
    }

    /// Anonymous memory laid out as `ranges` (start, size).
    public convenience init(anonymous ranges: [(GuestAddress, UInt64)]) throws(SwiftletError) {
        try self.init(ranges.map { RegionSpec(start: $0.0, size: $0.1) })
    }

    /// Total bytes of guest memory.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// Pages of guest memory (4 KiB) over all regions.
    public var pageCount: Int { (firstPage.last ?? 0) + Int((regions.last?.size ?? 0) / Self.pageSize) }

    /// The pages this process holds a private, written copy of (numbered over all regions in
    /// order, as runs): present, anonymous and mapped here only, in /proc/self/pagemap. After a
    /// restore these are the pages written since (by the guest or by devices); pages only read
    /// are still the snapshot file's (or the shared zero page) and are not included.
    public func writtenPageRuns() throws(SwiftletError) -> [Range<Int>] {
        let pagemap = try OwnedFileDescriptor.open("/proc/self/pagemap", flags: O_RDONLY, what: "page map")
        var runs: [Range<Int>] = []
        let batch = 1 << 16
        var entries = [UInt64](repeating: 0, count: batch)
        for (index, region) in regions.enumerated() {
            let pages = Int(region.size / Self.pageSize)
            let firstVirtualPage = UInt64(UInt(bitPattern: region.hostAddress)) / Self.pageSize
            var done = 0
            while done < pages {
                let count = min(batch, pages - done)
                let offset = (firstVirtualPage + UInt64(done)) * 8
                let read: Result<Void, SwiftletError> = entries.withUnsafeMutableBytes { buffer in
                    Result { () throws(SwiftletError) in
                        try pagemap.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count * 8]), at: offset, what: "page map")
                    }
                }
                try read.get()
                for i in 0..<count where Self.isPrivateWrittenPage(entries[i]) {
                    runs.appendMerging(firstPage[index] + done + i ..< firstPage[index] + done + i + 1)
                }
                done += count
            }
        }
        return runs
    }

    /// A pagemap entry (Documentation/admin-guide/mm/pagemap.rst): bit 63 present, bit 61 a file
    /// page or shared anonymous, bit 56 mapped by this process only.
    static func isPrivateWrittenPage(_ entry: UInt64) -> Bool {
        entry >> 63 & 1 == 1 && entry >> 61 & 1 == 0 && entry >> 56 & 1 == 1
    }

    /// Makes `runs` of pages (numbered as in `writtenPageRuns`) present and writable now, each a
    /// private copy, without changing their contents (MADV_POPULATE_WRITE): a restored guest that
    /// writes them then faults only in the hypervisor, not also in the host. Best effort: returns
    /// false when the kernel cannot (before Linux 5.14) or a run is out of range.
    @discardableResult
    public func populateForWriting(_ runs: [Range<Int>]) -> Bool {
        for run in runs where !run.isEmpty {
            var first = run.lowerBound
            while first < run.upperBound {
                guard let index = firstPage.lastIndex(where: { $0 <= first }) else { return false }
                let regionPages = Int(regions[index].size / Self.pageSize)
                let inRegion = first - firstPage[index]
                guard inRegion < regionPages else { return false }
                let count = min(run.upperBound - first, regionPages - inRegion)
                let p = regions[index].hostAddress + inRegion * Int(Self.pageSize)
                if madvise(p, count * Int(Self.pageSize), MADV_POPULATE_WRITE) != 0 { return false }
                first += count
            }
        }
        return true
    }

    /// Bytes of guest memory currently resident on the host (touched by guest or VMM).
    public var residentBytes: Int {
        owners.reduce(0) { $0 + $1.mapping.residentBytes() }
    }

    /// The host pointer for `length` bytes at `address`, which must lie inside one region. Use
    /// `hostPointer(forWriting:length:)` to write through it.
    public func hostPointer(_ address: GuestAddress, length: UInt64) throws(SwiftletError) -> UnsafeMutableRawPointer {
        try pointer(address, length: length, writing: false)
    }

    /// `hostPointer` for a device that will write there (the pages are recorded as written).
    public func hostPointer(forWriting address: GuestAddress, length: UInt64) throws(SwiftletError) -> UnsafeMutableRawPointer {
        try pointer(address, length: length, writing: true)
    }

    private func pointer(_ address: GuestAddress, length: UInt64, writing: Bool) throws(SwiftletError) -> UnsafeMutableRawPointer {
        for (index, region) in regions.enumerated() where address.rawValue >= region.start.rawValue && address.rawValue < region.end {
            let offset = address.rawValue - region.start.rawValue
            guard length <= region.size - offset else { break }
            if writing { recordWrite(region: index, offset: offset, length: length) }
            // SAFETY: [offset, offset + length) was just checked to lie inside the region's mapping.
            return region.hostAddress + Int(offset)
        }
        throw SwiftletError(.outOfBounds, "guest memory access of \(length) bytes at \(address) is outside guest RAM")
    }

    /// Whether `length` bytes at `address` lie inside one region.
    public func contains(_ address: GuestAddress, length: UInt64) -> Bool {
        regions.contains { address.rawValue >= $0.start.rawValue && address.rawValue < $0.end && length <= $0.end - address.rawValue }
    }

    // MARK: bytes

    public func write(_ bytes: some Collection<UInt8>, at address: GuestAddress) throws(SwiftletError) {
        let p = try hostPointer(forWriting: address, length: UInt64(bytes.count))
        // SAFETY: hostPointer checked that bytes.count bytes fit.
        UnsafeMutableRawBufferPointer(start: p, count: bytes.count).copyBytes(from: bytes)
    }

    public func read(count: Int, at address: GuestAddress) throws(SwiftletError) -> [UInt8] {
        let p = try hostPointer(address, length: UInt64(count))
        // SAFETY: hostPointer checked that count bytes fit.
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }

    /// Zeroes `count` bytes at `address`.
    public func fill(zero count: UInt64, at address: GuestAddress) throws(SwiftletError) {
        guard count > 0 else { return }
        let p = try hostPointer(forWriting: address, length: count)
        // SAFETY: hostPointer checked the range.
        p.initializeMemory(as: UInt8.self, repeating: 0, count: Int(count))
    }

    /// Replaces `length` bytes at `address` with a private, copy-on-write view of the file `fd` from
    /// `offset` (restoring a diff snapshot over its parent). Page-aligned; the guest must not be running.
    public func mapFile(_ fd: Int32, offset: UInt64, over address: GuestAddress, length: UInt64) throws(SwiftletError) {
        guard address.rawValue & Self.pageMask == 0, length & Self.pageMask == 0, offset & Self.pageMask == 0, length > 0 else {
            throw SwiftletError(.invalidArgument, "file mappings into guest memory must be page-aligned")
        }
        let p = try hostPointer(address, length: length)
        // SAFETY: [p, p + length) lies inside one of our mappings (checked above); MAP_FIXED replaces
        // exactly those pages, and the region's owner still unmaps the whole range at the end.
        guard let result = mmap(p, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off_t(offset)),
              result != MAP_FAILED else {
            throw SwiftletError.system("cannot map \(length) bytes of a snapshot over guest memory at \(address)", errno: currentErrno)
        }
    }

    /// Gives the host pages of `length` bytes at `address` back to the host (MADV_DONTNEED): the
    /// guest has said it does not use them (a balloon's pages, free pages it reported). The range
    /// stays mapped, so a guest or device that touches it anyway is not hurt: anonymous memory
    /// reads zeros again, a copy-on-write view of a snapshot its saved bytes, lazily restored
    /// memory faults in again. Page-aligned and inside one region, else nothing is done and
    /// false returned.
    @discardableResult
    public func discard(_ address: GuestAddress, length: UInt64) -> Bool {
        guard length > 0, address.rawValue & Self.pageMask == 0, length & Self.pageMask == 0,
              let p = try? hostPointer(address, length: length) else { return false }
        // SAFETY: [p, p + length) lies inside one of our mappings (checked by hostPointer).
        return madvise(p, Int(length), MADV_DONTNEED) == 0
    }

    static let hugePageSize = 2 << 20
    static let pageSize: UInt64 = 4096
    static let pageMask: UInt64 = pageSize - 1

    /// A writable view of `count` bytes at `address`, for loaders that fill memory from files.
    public func withBuffer<R, E: Error>(at address: GuestAddress, count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(SwiftletError) -> Result<R, E> {
        let p = try hostPointer(forWriting: address, length: UInt64(count))
        // SAFETY: hostPointer checked the range.
        let buffer = UnsafeMutableRawBufferPointer(start: p, count: count)
        do throws(E) { return .success(try body(buffer)) } catch { return .failure(error) }
    }

    // MARK: little-endian integers

    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(SwiftletError) {
        let p = try hostPointer(forWriting: address, length: UInt64(MemoryLayout<T>.size))
        // SAFETY: the range was checked; storeBytes tolerates unaligned addresses.
        p.storeBytes(of: value.littleEndian, as: T.self)
    }

    public func read<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: GuestAddress) throws(SwiftletError) -> T {
        let p = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        // SAFETY: the range was checked; loadUnaligned tolerates any alignment.
        return T(littleEndian: p.loadUnaligned(as: T.self))
    }
}
