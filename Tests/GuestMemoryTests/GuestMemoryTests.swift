import Glibc
import SwiftletSystem
import Testing
@testable import GuestMemory

@Suite struct GuestMemoryTests {
    @Test func littleEndianAccessAndBounds() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 0x10000), (GuestAddress(0x100000), 0x10000)])
        try memory.write(UInt32(0x1122_3344), at: GuestAddress(0x10))
        #expect(try memory.read(count: 4, at: GuestAddress(0x10)) == [0x44, 0x33, 0x22, 0x11])
        #expect(try memory.read(UInt16.self, at: GuestAddress(0x11)) == 0x2233)
        try memory.write(UInt64.max, at: GuestAddress(0x10FFF8))
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x10FFF8)) == .max)
        #expect(memory.totalSize == 0x20000)
        // Past the end of a region, in the hole, and straddling a region's end.
        #expect(throws: SwiftletError.self) { try memory.write(UInt64(1), at: GuestAddress(0xFFFC)) }
        #expect(throws: SwiftletError.self) { try memory.read(UInt8.self, at: GuestAddress(0x20000)) }
        #expect(throws: SwiftletError.self) { try memory.read(count: 2, at: GuestAddress(0x10FFFF)) }
        #expect(throws: SwiftletError.self) { try memory.read(UInt8.self, at: GuestAddress(UInt64.max)) }
        #expect(memory.contains(GuestAddress(0x100000), length: 0x10000))
        #expect(!memory.contains(GuestAddress(0x100000), length: 0x10001))
    }

    @Test func rejectsOverlappingOrUnalignedRegions() {
        #expect(throws: SwiftletError.self) { try GuestMemory(anonymous: [(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 0x1000)]) }
        #expect(throws: SwiftletError.self) { try GuestMemory(anonymous: [(GuestAddress(0x10), 0x1000)]) }
        #expect(throws: SwiftletError.self) { try GuestMemory(anonymous: [(GuestAddress(0), 0)]) }
    }

    @Test func untouchedMemoryIsNotResident() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 64 << 20)])
        #expect(memory.residentBytes < 1 << 20)
        try memory.fill(zero: 0, at: GuestAddress(0))
        try memory.write([UInt8](repeating: 1, count: 8192), at: GuestAddress(0x200000))
        #expect(memory.residentBytes >= 8192)
    }

    @Test func privateFileMappingIsCopyOnWrite() throws {
        var template = Array("/tmp/swiftlet-mem.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        defer { close(fd); template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) } }
        ftruncate(fd, 8192)
        var bytes: [UInt8] = [9, 8, 7, 6]
        _ = pwrite(fd, &bytes, 4, 4096)
        let memory = try GuestMemory([.init(start: GuestAddress(0), size: 8192, backing: .file(descriptor: fd, offset: 0, shared: false))])
        #expect(try memory.read(count: 4, at: GuestAddress(4096)) == [9, 8, 7, 6])
        try memory.write(UInt32(0), at: GuestAddress(4096))
        var back: [UInt8] = [0, 0, 0, 0]
        _ = pread(fd, &back, 4, 4096)
        #expect(back == [9, 8, 7, 6], "a private mapping must never write through to the file")
    }
}

@Suite struct WrittenPagesTests {
    static func temporaryFile(size: Int, pattern: UInt8) -> (fd: Int32, path: String) {
        var template = Array("/tmp/swiftlet-ws.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        let bytes = [UInt8](repeating: pattern, count: size)
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return (fd, path)
    }

    @Test func anonymousPagesCountOnceWrittenNotWhenOnlyRead() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 8 << 20), (GuestAddress(16 << 20), 4 << 20)])
        #expect(memory.pageCount == 3072)
        #expect(try memory.writtenPageRuns() == [])
        _ = try memory.read(UInt64.self, at: GuestAddress(0x600000)) // the zero page: not a private copy
        try memory.write(UInt8(1), at: GuestAddress(3 * 4096))
        try memory.write(UInt8(1), at: GuestAddress((16 << 20) + 5 * 4096))
        let runs = try memory.writtenPageRuns()
        let pages = Set(runs.flatMap { Array($0) })
        #expect(pages.contains(3) && pages.contains(2048 + 5), "\(runs)")
        // A written page may bring its whole 2 MiB huge page, never another chunk.
        #expect(pages.allSatisfy { $0 < 512 || (2048..<2560).contains($0) }, "\(runs)")
        #expect(zip(runs, runs.dropFirst()).allSatisfy { $0.upperBound < $1.lowerBound }, "sorted and merged")
    }

    @Test func populatingFileBackedPagesCopiesThemWithoutChangingThemOrTheFile() throws {
        let file = Self.temporaryFile(size: 64 << 10, pattern: 0x5A)
        defer { close(file.fd); unlink(file.path) }
        let memory = try GuestMemory([.init(start: GuestAddress(0), size: 64 << 10, backing: .file(descriptor: file.fd, offset: 0, shared: false))])
        _ = try memory.read(count: 16, at: GuestAddress(4096)) // read only: still the file's page
        try memory.write(UInt8(0x11), at: GuestAddress(9 * 4096))
        #expect(try memory.writtenPageRuns() == [9..<10])
        #expect(memory.populateForWriting([2..<5, 12..<14]))
        #expect(try memory.writtenPageRuns() == [2..<5, 9..<10, 12..<14])
        #expect(try memory.read(count: 4096, at: GuestAddress(2 * 4096)).allSatisfy { $0 == 0x5A }, "contents kept")
        #expect(try memory.read(UInt8.self, at: GuestAddress(9 * 4096)) == 0x11)
        var back = [UInt8](repeating: 0, count: 64 << 10)
        _ = back.withUnsafeMutableBytes { pread(file.fd, $0.baseAddress, $0.count, 0) }
        #expect(back.allSatisfy { $0 == 0x5A }, "the file is never written")
        #expect(!memory.populateForWriting([15..<17]), "a run past the end is refused")
    }
}
