import Glibc
import GuestMemory
import MachineState
import Synchronization
import SwiftletSystem
import Testing
import TestSupport

/// A memory file's bytes served in chunks, as a pack's memory part is: counting reads, and
/// failing on the chunks it is told to.
final class ChunkedMemoryFile: MemoryImageSource, @unchecked Sendable {
    let bytes: [UInt8]
    let chunkSize: Int
    let damaged: Set<Int>
    let reads = Mutex<[Int]>([])
    var size: UInt64 { UInt64(bytes.count) }

    init(_ bytes: [UInt8], chunkSize: Int = 1 << 20, damaged: Set<Int> = []) {
        self.bytes = bytes; self.chunkSize = chunkSize; self.damaged = damaged
    }

    func range(_ index: Int) -> Range<Int> { index * chunkSize..<min(bytes.count, (index + 1) * chunkSize) }

    func isZero(chunk index: Int) -> Bool { bytes[range(index)].allSatisfy { $0 == 0 } }

    func read(chunk index: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) {
        reads.withLock { $0.append(index) }
        guard !damaged.contains(index) else { throw SwiftletError(.invalidFormat, "chunk \(index) is damaged") }
        bytes[range(index)].withUnsafeBytes { buffer.copyMemory(from: $0) }
    }
}

/// Memory restored lazily through a userfaultfd: each touched page's chunk comes in once, intact,
/// chunks of zeros without a read, untouched chunks never; a damaged chunk is reported and never
/// leaves a thread waiting.
@Suite(.enabled(if: UserFaultFD.isAvailable, "needs userfaultfd (root, or vm.unprivileged_userfaultfd=1)"))
struct LazyMemoryTests {
    let dir = TemporaryDirectory()

    /// A machine's memory of two regions (3 MiB at 0, 2 MiB at 4 GiB) with a pattern in some
    /// megabytes and zeros elsewhere, saved as a memory file; its bytes, the id and the pattern.
    func savedMemory() throws -> (file: [UInt8], id: SnapshotID, original: GuestMemory) {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 3 << 20), (GuestAddress(4 << 30), 2 << 20)])
        for (address, seed) in [(UInt64(0x1000), UInt8(1)), (0x20_0000, 2), ((4 << 30) + 0x10_0000, 3)] {
            try memory.write((0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 7) &+ seed }, at: GuestAddress(address))
        }
        let id = try SnapshotID.random()
        let path = dir.path + "/memory"
        _ = try MemoryFile.write(memory, to: path, id: id)
        return (try OwnedFileDescriptor.readSmallFile(path, limit: 16 << 20), id, memory)
    }

    @Test func touchedPagesArriveIntactAndUntouchedChunksAreNeverRead() throws {
        let (bytes, id, original) = try savedMemory()
        let source = ChunkedMemoryFile(bytes)
        let lazy = try LazyMemory(source: source, id: id, what: "the test's memory", onFailure: { Issue.record("no failure expected: \($0)") })
        defer { lazy.stop() }
        #expect(source.reads.withLock { $0 } == [0], "only the header's chunk is read up front")
        // The first region's data (chunk 0 holds the header and its first 1 MiB less a page).
        for (address, count) in [(UInt64(0x1000), 70_000), (0x20_0000, 70_000), ((4 << 30) + 0x10_0000, 70_000), (0x2F_F000, 4096)] {
            #expect(try lazy.memory.read(count: count, at: GuestAddress(address)) == original.read(count: count, at: GuestAddress(address)),
                    "memory at \(address) is the saved memory")
        }
        // A page of zeros in a chunk of zeros: no read.
        #expect(try lazy.memory.read(count: 16, at: GuestAddress((4 << 30) + (2 << 20) - 4096)) == [UInt8](repeating: 0, count: 16))
        let progress = lazy.progress
        #expect(progress.chunksZero >= 1 && progress.failure == nil)
        let reads = source.reads.withLock { $0 }
        #expect(Set(reads).count == reads.count, "each chunk is read once: \(reads)")
        #expect(reads.count < bytes.count / (1 << 20), "chunks nobody touched are not read: \(reads)")
        // A write lands, and reads back, in the filled memory.
        try lazy.memory.write([9, 9, 9], at: GuestAddress(0x1000))
        #expect(try lazy.memory.read(count: 3, at: GuestAddress(0x1000)) == [9, 9, 9])
    }

    @Test func aPageGivenBackAfterItsChunkCameInReadsAsZerosWhenTouchedAgain() throws {
        // A balloon gives a page the guest freed back to the host (MADV_DONTNEED): it is missing
        // again in registered memory, and the next touch must be answered (the zero page), not
        // woken without a page (which would leave the toucher faulting for ever).
        let (bytes, id, original) = try savedMemory()
        let lazy = try LazyMemory(source: ChunkedMemoryFile(bytes), id: id, what: "the test's memory", onFailure: { _ in })
        defer { lazy.stop() }
        #expect(try lazy.memory.read(count: 4096, at: GuestAddress(0x20_0000)) == original.read(count: 4096, at: GuestAddress(0x20_0000)))
        #expect(lazy.memory.discard(GuestAddress(0x20_0000), length: 4096))
        #expect(try lazy.memory.read(count: 4096, at: GuestAddress(0x20_0000)) == [UInt8](repeating: 0, count: 4096))
        try lazy.memory.write([5], at: GuestAddress(0x20_0000))
        #expect(try lazy.memory.read(count: 1, at: GuestAddress(0x20_0000)) == [5])
        #expect(try lazy.memory.read(count: 16, at: GuestAddress(0x20_1000)) == original.read(count: 16, at: GuestAddress(0x20_1000)))
    }

    @Test func manyThreadsFaultingOnOneChunkAllGetIt() throws {
        let (bytes, id, original) = try savedMemory()
        let source = ChunkedMemoryFile(bytes)
        let lazy = try LazyMemory(source: source, id: id, what: "the test's memory", onFailure: { _ in })
        defer { lazy.stop() }
        let expected = try original.read(count: 4096, at: GuestAddress(0x20_0000))
        let results = Mutex<[[UInt8]]>([])
        let threads = try (0..<6).map { n in
            try OSThread.start(name: "toucher-\(n)") {
                let page = (try? lazy.memory.read(count: 4096, at: GuestAddress(0x20_0000))) ?? []
                results.withLock { $0.append(page) }
            }
        }
        for thread in threads { thread.join() }
        #expect(results.withLock { $0 }.allSatisfy { $0 == expected })
        #expect(source.reads.withLock { $0.filter { $0 == 2 } }.count == 1, "the chunk was read once")
    }

    @Test func aDamagedChunkIsReportedOnceAndItsPagesReadAsZero() throws {
        let (bytes, id, _) = try savedMemory()
        let source = ChunkedMemoryFile(bytes, damaged: [2])
        let failures = Mutex<[String]>([])
        let lazy = try LazyMemory(source: source, id: id, what: "the test's memory", onFailure: { error in failures.withLock { $0.append(error.message) } })
        defer { lazy.stop() }
        #expect(try lazy.memory.read(count: 8, at: GuestAddress(0x20_0000)) == [UInt8](repeating: 0, count: 8), "no thread waits forever")
        _ = try lazy.memory.read(count: 8, at: GuestAddress(0x20_1000))
        #expect(failures.withLock { $0 } == ["chunk 2 is damaged"])
        #expect(lazy.progress.failure?.message == "chunk 2 is damaged")
    }

    @Test func aSourceThatIsNotThisSnapshotsMemoryIsRefused() throws {
        let (bytes, _, _) = try savedMemory()
        let other = try SnapshotID.random()
        #expect(throws: SwiftletError.self) { try LazyMemory(source: ChunkedMemoryFile(bytes), id: other, what: "it", onFailure: { _ in }) }
        var cut = bytes
        cut.removeLast(4096)
        let error = #expect(throws: SwiftletError.self) {
            try LazyMemory(source: ChunkedMemoryFile(cut), id: other, what: "the cut memory", onFailure: { _ in })
        }
        #expect(error?.message.contains("the cut memory is truncated") == true, "\(String(describing: error))")
        let odd = #expect(throws: SwiftletError.self) {
            try LazyMemory(source: ChunkedMemoryFile(bytes, chunkSize: 1000), id: other, what: "odd", onFailure: { _ in })
        }
        #expect(odd?.message.contains("chunks of 1000 bytes") == true)
    }
}
