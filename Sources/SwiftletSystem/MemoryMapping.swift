import Glibc
import SystemPackage

/// Sole owner of an mmap(2)ed range; unmaps it when the owner goes away.
public struct MemoryMapping: ~Copyable, @unchecked Sendable {
    // SAFETY (Sendable): the mapping's address is fixed for its lifetime; synchronising access to
    // the bytes is the user's job, as with any shared memory.
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of anonymous, private, zero-filled memory at an address aligned to
    /// `alignment` (a power of two). `MAP_NORESERVE` keeps untouched guest memory from counting
    /// against the host's commit limit. With `transparentHugePages`, the range is advised for
    /// transparent huge pages: with 2 MiB alignment, KVM can then map guest memory with 2 MiB
    /// pages (one fault and one TLB entry per 2 MiB instead of 512).
    public static func anonymous(size: Int, alignment: Int = 4096, transparentHugePages: Bool = false) throws(SwiftletError) -> MemoryMapping {
        precondition(size > 0 && alignment > 0 && alignment & (alignment - 1) == 0)
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
        let padded = size + (alignment > 4096 ? alignment : 0)
        guard let raw = mmap(nil, padded, PROT_READ | PROT_WRITE, flags, -1, 0), raw != MAP_FAILED else {
            throw SwiftletError.system("cannot map \(size >> 20) MiB of memory", errno: currentErrno)
        }
        // Trim the padding so the mapping starts on an `alignment` boundary.
        let address = UInt(bitPattern: raw)
        let aligned = (address + UInt(alignment) - 1) & ~(UInt(alignment) - 1)
        let head = Int(aligned - address)
        // SAFETY: [raw, raw + padded) is ours; head and tail are the unused ends of it.
        if head > 0 { munmap(raw, head) }
        if padded - head - size > 0 { munmap(raw + head + size, padded - head - size) }
        let base = raw + head
        if transparentHugePages { _ = madvise(base, size, MADV_HUGEPAGE) }
        return MemoryMapping(base: base, size: size)
    }

    /// Maps `size` bytes of the file `fd` from `offset`. `shared: false` gives a copy-on-write
    /// (MAP_PRIVATE) view: pages load on first touch and writes never reach the file.
    public static func file(fd: Int32, size: Int, offset: UInt64 = 0, writable: Bool, shared: Bool) throws(SwiftletError) -> MemoryMapping {
        precondition(size > 0)
        let prot = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let flags = shared ? MAP_SHARED : MAP_PRIVATE
        guard let p = mmap(nil, size, prot, flags, fd, off_t(offset)), p != MAP_FAILED else {
            throw SwiftletError.system("cannot map \(size) bytes of a file", errno: currentErrno)
        }
        return MemoryMapping(base: p, size: size)
    }

    private init(base: UnsafeMutableRawPointer, size: Int) {
        self.base = base
        self.size = size
    }

    deinit { munmap(base, size) }

    /// The mapping as a raw buffer.
    public var buffer: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: size) }

    /// Bytes of this mapping resident in host memory now (mincore).
    public func residentBytes() -> Int {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let pages = (size + page - 1) / page
        var vector = [UInt8](repeating: 0, count: pages)
        let ok = vector.withUnsafeMutableBufferPointer { mincore(base, size, $0.baseAddress) }
        guard ok == 0 else { return 0 }
        return vector.reduce(0) { $0 + Int($1 & 1) } * page
    }
}
