import Glibc
import MachineState
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// The destination's checks of what a migration source sends: the layout, the disk list, page
/// runs and disk writes, each refused with a clear error when it does not fit.
@Suite struct MigrationReceiverTests {
    let dir = TemporaryDirectory()

    func layout(_ regions: [(UInt64, UInt64)]) -> [UInt8] {
        var bytes = [UInt8](repeating: 9, count: 16) + LittleEndian.bytes(UInt64(regions.count), 4)
        for (start, size) in regions { bytes += LittleEndian.bytes(start, 8) + LittleEndian.bytes(size, 8) }
        return bytes
    }

    func receiver(_ regions: [(UInt64, UInt64)], name: String = "r") throws(SwiftletError) -> MigrationReceiver {
        let path = dir.path + "/" + name
        mkdir(path, 0o700)
        return try MigrationReceiver(layout: layout(regions), directory: SnapshotDirectory(path), maximumBytes: 1 << 30)
    }

    func error(_ body: () throws -> Void) -> String {
        do { try body(); return "" } catch { return "\(error)" }
    }

    @Test func badLayoutsAreRefused() {
        #expect(error { _ = try receiver([], name: "a") }.contains("names 0 memory regions"))
        #expect(error { _ = try receiver([(0, 4097)], name: "b") }.contains("not page-aligned"))
        #expect(error { _ = try receiver([(0x2000, 0x2000), (0x1000, 0x1000)], name: "c") }.contains("out of order"))
        #expect(error { _ = try receiver([(0, 2 << 30)], name: "d") }.contains("larger than this host takes"))
        #expect(error { _ = try receiver([(UInt64.max - 4095, 8192)], name: "e") }.contains("not page-aligned, empty, or out of order"))
        #expect(error {
            _ = try MigrationReceiver(layout: Array(layout([(0, 4096)]).prefix(25)), directory: SnapshotDirectory(dir.path), maximumBytes: 1 << 30)
        }.contains("regions in"))
    }

    @Test func pagesGoWhereTheLayoutSaysAndRunsOutsideItAreRefused() throws {
        let r = try receiver([(0, 0x4000), (0x10_0000, 0x2000)])
        let page = LittleEndian.bytes(4, 8) + LittleEndian.bytes(1, 4) + [UInt8](repeating: 0x5A, count: 4096)
        try r.write(pages: page) // page 4: the first page of the second region
        let written = try r.descriptor.size()
        #expect(written == r.file.fileBytes)
        let file = try OwnedFileDescriptor.open(r.directory.memoryPath, flags: O_RDONLY)
        #expect(try file.read(count: 4096, at: r.file.dataOffset + 4 * 4096, what: "memory") == [UInt8](repeating: 0x5A, count: 4096))
        try r.zero(LittleEndian.bytes(4, 8) + LittleEndian.bytes(1, 4))
        #expect(try file.read(count: 4096, at: r.file.dataOffset + 4 * 4096, what: "memory") == [UInt8](repeating: 0, count: 4096))
        #expect(error { try r.write(pages: LittleEndian.bytes(5, 8) + LittleEndian.bytes(2, 4) + [UInt8](repeating: 1, count: 8192)) }
            .contains("lies outside the machine's 6 pages"))
        #expect(error { try r.write(pages: LittleEndian.bytes(0, 8) + LittleEndian.bytes(2, 4) + [UInt8](repeating: 1, count: 4096)) }
            .contains("does not match its page count"))
        #expect(error { try r.zero(LittleEndian.bytes(0, 8) + LittleEndian.bytes(0, 4)) }.contains("outside"))
        #expect(error { try r.zero([1, 2, 3]) }.contains("truncated"))
        #expect(try r.descriptor.size() == r.file.fileBytes, "nothing refused grew the file")
    }

    /// Pages sent again (the guest wrote them during the copy) become the working set the
    /// restored machine copies in; pages sent once do not.
    @Test func pagesThatArriveAgainAreTheWorkingSet() throws {
        let r = try receiver([(0, 0x4000), (0x10_0000, 0x4000)], name: "hot") // pages 0-3, then 4-7
        func run(_ first: UInt64, _ count: UInt64) -> [UInt8] {
            LittleEndian.bytes(first, 8) + LittleEndian.bytes(count, 4) + [UInt8](repeating: 7, count: Int(count) * 4096)
        }
        try r.write(pages: run(0, 8))
        #expect(try r.hotPages() == nil, "every page arrived once")
        try r.write(pages: run(1, 2))
        try r.write(pages: run(3, 1))
        try r.write(pages: run(7, 1))
        let set = try #require(try r.hotPages())
        #expect(set.runs == [1..<4, 7..<8], "adjacent pages make one run; the last page closes its own")
        #expect(set.snapshot == r.file.id && set.pageCount == 8)
        // What the restore reads back.
        #expect(try WorkingSet.decode(set.encode(), path: "set", snapshot: r.file.id, pageCount: 8) == set)
    }

    @Test func diskWritesStayInsideTheirDisk() throws {
        let r = try receiver([(0, 0x1000)], name: "disks")
        try r.disks(LittleEndian.bytes(1, 4) + LittleEndian.bytes(2, 4) + LittleEndian.bytes(0x10000, 8))
        try r.write(disk: LittleEndian.bytes(2, 4) + LittleEndian.bytes(0xF000, 8) + [UInt8](repeating: 7, count: 4096))
        #expect(error { try r.write(disk: LittleEndian.bytes(2, 4) + LittleEndian.bytes(0xF001, 8) + [UInt8](repeating: 7, count: 4096)) }
            .contains("lies outside drive 2"))
        #expect(error { try r.write(disk: LittleEndian.bytes(2, 4) + LittleEndian.bytes(UInt64.max, 8) + [1]) }.contains("lies outside"))
        #expect(error { try r.write(disk: LittleEndian.bytes(0, 4) + LittleEndian.bytes(0, 8) + [1]) }.contains("not in the disk list"))
        #expect(error { try r.write(disk: LittleEndian.bytes(2, 4) + LittleEndian.bytes(0, 8)) }.contains("empty, truncated"))
        #expect(try r.diskFiles[2]?.file.size() == 0x10000)
        let other = try receiver([(0, 0x1000)], name: "disks2")
        #expect(error { try other.disks(LittleEndian.bytes(2, 4) + LittleEndian.bytes(1, 4) + LittleEndian.bytes(1, 8)) }.contains("disk list names 2 disks"))
        #expect(error { try other.disks(LittleEndian.bytes(1, 4) + LittleEndian.bytes(99, 4) + LittleEndian.bytes(1, 8)) }.contains("malformed"))
        #expect(error { try other.disks(LittleEndian.bytes(1, 4) + LittleEndian.bytes(1, 4) + LittleEndian.bytes(UInt64.max, 8)) }.contains("malformed"))
    }
}
