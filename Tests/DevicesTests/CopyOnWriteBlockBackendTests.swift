import Glibc
import SwiftletSystem
import TestSupport
import Testing
@testable import Devices

@Suite struct CopyOnWriteBlockBackendTests {
    /// A 64 KiB base whose every byte is known: byte i is i*7 (mod 256).
    static func makeBase(_ dir: TemporaryDirectory) -> (path: String, bytes: [UInt8]) {
        let bytes = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        return (dir.write("base.img", bytes), bytes)
    }

    static func readAll(_ backend: any BlockBackend) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(backend.byteCount))
        try out.withUnsafeMutableBytes { try backend.read(into: $0, at: 0) }
        return out
    }

    static func write(_ backend: any BlockBackend, _ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try backend.write(from: $0, at: offset) }
    }

    @Test func readsTheBaseUntilWrittenAndNeverChangesIt() throws {
        let dir = TemporaryDirectory()
        let (base, expected) = Self.makeBase(dir)
        let disk = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/overlay")
        #expect(disk.byteCount == 65536)
        #expect(try Self.readAll(disk) == expected)
        #expect(disk.heldChunks == 0)

        // A write of part of a chunk, one that spans two chunks, and a whole-chunk write.
        var model = expected
        let writes: [(UInt64, [UInt8])] = [(100, [1, 2, 3]), (4096 * 3 - 10, [UInt8](repeating: 9, count: 20)),
                                           (4096 * 8, [UInt8](repeating: 5, count: 4096))]
        for (offset, bytes) in writes {
            try Self.write(disk, bytes, at: offset)
            model.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes)
        }
        #expect(try Self.readAll(disk) == model)
        // The chunks those writes touch, by chunk size (the overlay filesystem's block size, 4 KiB to 1 MiB):
        // 4 KiB: 0, 2, 3, 8; 8 KiB: 0, 1, 4; 16 KiB: 0, 2; 32 KiB: 0, 1; 64 KiB and more: 0.
        #expect(disk.chunkSize >= 4096 && disk.chunkSize <= 1 << 20 && disk.chunkSize.nonzeroBitCount == 1)
        let touched: [UInt64: Int] = [4096: 4, 8192: 3, 16384: 2, 32768: 2]
        #expect(disk.heldChunks == touched[disk.chunkSize, default: 1])
        // An unaligned read across held and unheld chunks.
        var middle = [UInt8](repeating: 0, count: 5000)
        try middle.withUnsafeMutableBytes { try disk.read(into: $0, at: 4096 * 2 + 1) }
        #expect(middle == Array(model[(4096 * 2 + 1)..<(4096 * 2 + 5001)]))
        // The base is untouched.
        #expect(try OwnedFileDescriptor.readSmallFile(base) == expected)
    }

    @Test func anOverlayOpenedAgainHoldsItsWrites() throws {
        let dir = TemporaryDirectory()
        let (base, expected) = Self.makeBase(dir)
        var model = expected
        do {
            let disk = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/overlay")
            try Self.write(disk, [0xAA, 0xBB], at: 5000)
            try Self.write(disk, [0, 0, 0, 0], at: 60000) // zeros are data too
            try disk.flush()
        }
        model.replaceSubrange(5000..<5002, with: [0xAA, 0xBB])
        model.replaceSubrange(60000..<60004, with: [0, 0, 0, 0])
        let again = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/overlay")
        #expect(try Self.readAll(again) == model)
        // Bytes 5000 and 60000 fall in different chunks up to 32 KiB ones, in the first chunk beyond.
        #expect(again.heldChunks == (again.chunkSize <= 32768 ? 2 : 1))
    }

    @Test func twoOverlaysOfOneBaseDivergeIndependently() throws {
        let dir = TemporaryDirectory()
        let (base, expected) = Self.makeBase(dir)
        let first = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/a")
        let second = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/b")
        try Self.write(first, [1, 1, 1], at: 0)
        try Self.write(second, [2, 2], at: 1)
        var a = expected, b = expected
        a.replaceSubrange(0..<3, with: [1, 1, 1])
        b.replaceSubrange(1..<3, with: [2, 2])
        #expect(try Self.readAll(first) == a)
        #expect(try Self.readAll(second) == b)
    }

    @Test func aSparseCopyIsTheDiskAsTheGuestSeesIt() throws {
        let dir = TemporaryDirectory()
        // A mostly empty base: one data block at 1 MiB in a 4 MiB file.
        let basePath = dir.path + "/base.img"
        let fd = open(basePath, O_RDWR | O_CREAT, 0o600)
        #expect(ftruncate(fd, 4 << 20) == 0)
        let block = [UInt8](repeating: 0x5A, count: 4096)
        _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 1 << 20) }
        close(fd)
        let disk = try CopyOnWriteBlockBackend(base: basePath, overlay: dir.path + "/overlay")
        try Self.write(disk, [7, 7, 7, 7], at: 3 << 20)
        let ranges = try disk.dataRanges()
        #expect(ranges.count == 2)
        #expect(ranges.allSatisfy { $0.count <= 1 << 16 }, "holes are not data: \(ranges)")

        try disk.copy(to: dir.path + "/copy.img")
        let copy = try FileBlockBackend(path: dir.path + "/copy.img", readOnly: true)
        #expect(try Self.readAll(copy) == Self.readAll(disk))
        #expect(try copy.dataRanges().reduce(0) { $0 + $1.count } <= 1 << 17)
        // Copying over an existing file is refused and leaves it alone.
        #expect(throws: SwiftletError.self) { try disk.copy(to: dir.path + "/copy.img") }
        #expect(try Self.readAll(copy) == Self.readAll(disk))
    }

    @Test func refusesAnOverlayOfAnotherSizeAndAccessPastTheEnd() throws {
        let dir = TemporaryDirectory()
        let (base, _) = Self.makeBase(dir)
        let wrong = dir.write("wrong", [UInt8](repeating: 1, count: 8192))
        let error = #expect(throws: SwiftletError.self) { try CopyOnWriteBlockBackend(base: base, overlay: wrong) }
        #expect(error?.message.contains("belongs to another disk") == true)
        #expect(try OwnedFileDescriptor.readSmallFile(wrong) == [UInt8](repeating: 1, count: 8192))
        #expect(throws: SwiftletError.self) { try CopyOnWriteBlockBackend(base: dir.path + "/missing", overlay: dir.path + "/o") }

        let disk = try CopyOnWriteBlockBackend(base: base, overlay: dir.path + "/overlay")
        #expect(throws: SwiftletError.self) { try Self.write(disk, [1, 2], at: 65535) }
        var byte = [UInt8](repeating: 0, count: 1)
        #expect(throws: SwiftletError.self) { try byte.withUnsafeMutableBytes { try disk.read(into: $0, at: 65536) } }
        #expect(disk.heldChunks == 0)
    }
}
