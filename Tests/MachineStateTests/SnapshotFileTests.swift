import Glibc
import GuestMemory
import SwiftletSystem
import Testing
import TestSupport
@testable import MachineState

struct Sample: Codable, Equatable {
    var name: String
    var blob: [UInt8]
}

@Suite struct StateFileTests {
    let sample = Sample(name: "vm", blob: Array(0..<200))

    @Test func roundTrips() throws {
        let bytes = try StateFile.encode(sample)
        #expect(Array(bytes.prefix(8)) == Array("SWLTSNAP".utf8))
        #expect(try StateFile.decode(Sample.self, from: bytes, path: "state") == sample)
    }

    @Test func everyFlippedPayloadByteIsCaught() throws {
        let bytes = try StateFile.encode(sample)
        for index in stride(from: StateFile.headerSize, to: bytes.count, by: 7) {
            var broken = bytes
            broken[index] ^= 0x01
            #expect { try StateFile.decode(Sample.self, from: broken, path: "s") } throws: {
                ($0 as! SwiftletError).message.contains("corrupt")
            }
        }
        var checksum = bytes
        checksum[30] ^= 0x80
        #expect(throws: SwiftletError.self) { try StateFile.decode(Sample.self, from: checksum, path: "s") }
    }

    @Test func truncatedOtherVersionsAndOtherFilesAreRefused() throws {
        let bytes = try StateFile.encode(sample)
        #expect { try StateFile.decode(Sample.self, from: Array(bytes.dropLast(5)), path: "s") } throws: {
            ($0 as! SwiftletError).message.contains("truncated")
        }
        for version: UInt8 in [3, 5] { // the previous format (devices by position) and a future one
            var other = bytes
            other[8] = version
            #expect { try StateFile.decode(Sample.self, from: other, path: "s") } throws: {
                let e = $0 as! SwiftletError
                return e.code == .unsupported && e.message.contains("version \(version)") && e.message.contains("reads version 4")
            }
        }
        #expect { try StateFile.decode(Sample.self, from: Array("hello".utf8), path: "notes.txt") } throws: {
            ($0 as! SwiftletError).message == "notes.txt is not a Swiftlet snapshot state file"
        }
    }
}

@Suite struct MemoryFileTests {
    static let layout: [(GuestAddress, UInt64)] = [(GuestAddress(0), 64 << 10), (GuestAddress(1 << 20), 32 << 10)]

    /// Memory with a recognisable pattern on a few pages and zeros elsewhere.
    func patterned() throws -> GuestMemory {
        let memory = try GuestMemory(anonymous: Self.layout)
        try memory.write([UInt8](repeating: 0xAA, count: 4096), at: GuestAddress(0x1000))
        try memory.write(Array("hello".utf8), at: GuestAddress(0x5003))
        try memory.write([UInt8](repeating: 0x55, count: 8192), at: GuestAddress((1 << 20) + 0x2000))
        return memory
    }

    func contents(_ memory: GuestMemory) throws -> [UInt8] {
        try memory.regions.flatMap { try memory.read(count: Int($0.size), at: $0.start) }
    }

    @Test func fullFileSkipsZeroPagesAndMapsBackCopyOnWrite() throws {
        let dir = TemporaryDirectory()
        let memory = try patterned()
        let id = try SnapshotID.random()
        let stats = try MemoryFile.write(memory, to: dir.path + "/memory", id: id)
        #expect(stats.pagesWritten == 4)
        let file = try MemoryFile.read(dir.path + "/memory")
        #expect(file.kind == .full && file.id == id && file.parent == nil)
        #expect(file.fileBytes == 4096 + (96 << 10))

        let restored = try MemoryFile.map(chain: [dir.path + "/memory"], id: id)
        #expect(restored.regions.map(\.start) == memory.regions.map(\.start))
        #expect(try contents(restored) == contents(memory))
        // Writes go to the private copy, never to the file.
        try restored.write(UInt32(0xDEAD_BEEF), at: GuestAddress(0x1000))
        let again = try MemoryFile.map(chain: [dir.path + "/memory"], id: id)
        #expect(try again.read(UInt32.self, at: GuestAddress(0x1000)) == 0xAAAA_AAAA)
    }

    @Test func diffHoldsOnlyDirtyPagesAndStacksOnItsParent() throws {
        let dir = TemporaryDirectory()
        let memory = try patterned()
        let base = try SnapshotID.random(), next = try SnapshotID.random()
        _ = try MemoryFile.write(memory, to: dir.path + "/full", id: base)
        // The guest writes pages 2 and 17 (region 2's first page is page 16).
        try memory.write(Array("second".utf8), at: GuestAddress(0x2000))
        try memory.write([UInt8](repeating: 0, count: 8192), at: GuestAddress((1 << 20) + 0x1000)) // zeroes page 18 too
        var dirty = [UInt64](repeating: 0, count: 1)
        for page in [2, 17, 18] { dirty[0] |= 1 << UInt64(page) }
        let stats = try MemoryFile.write(memory, to: dir.path + "/diff", id: next, diffFrom: base, dirty: dirty)
        #expect(stats.pagesWritten == 3)

        let restored = try MemoryFile.map(chain: [dir.path + "/full", dir.path + "/diff"], id: next)
        #expect(try contents(restored) == contents(memory))

        // A chain out of order, a diff without its parent, or the wrong snapshot: refused.
        #expect { try MemoryFile.map(chain: [dir.path + "/diff"], id: next) } throws: {
            ($0 as! SwiftletError).message.contains("a restore starts from a full snapshot")
        }
        #expect { try MemoryFile.map(chain: [dir.path + "/full"], id: next) } throws: {
            ($0 as! SwiftletError).message.contains("do not match")
        }
        let other = try SnapshotID.random()
        _ = try MemoryFile.write(memory, to: dir.path + "/other", id: other)
        #expect { try MemoryFile.map(chain: [dir.path + "/other", dir.path + "/diff"], id: next) } throws: {
            ($0 as! SwiftletError).message.contains("is not a diff of snapshot \(other)")
        }
    }

    @Test func manyScatteredDirtyPagesAreCopiedRatherThanMapped() throws {
        let dir = TemporaryDirectory()
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 32 << 20)])
        let base = try SnapshotID.random(), next = try SnapshotID.random()
        _ = try MemoryFile.write(memory, to: dir.path + "/full", id: base)
        let pages = 8192
        var dirty = [UInt64](repeating: 0, count: pages / 64)
        for page in stride(from: 0, to: pages, by: 2) {
            try memory.write(UInt64(page) | 1, at: GuestAddress(UInt64(page) * 4096 + 8))
            dirty[page / 64] |= 1 << UInt64(page % 64)
        }
        _ = try MemoryFile.write(memory, to: dir.path + "/diff", id: next, diffFrom: base, dirty: dirty)
        let restored = try MemoryFile.map(chain: [dir.path + "/full", dir.path + "/diff"], id: next)
        #expect(try contents(restored) == contents(memory))
    }

    @Test func holesAreAnonymousMemoryAndOnlyChunksWithDataMapTheFile() throws {
        let dir = TemporaryDirectory()
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 16 << 20)])
        // Data in the third 2 MiB chunk only: its last two pages.
        try memory.write([UInt8](repeating: 0x5A, count: 8192), at: GuestAddress((6 << 20) - 8192))
        let id = try SnapshotID.random()
        let path = dir.path + "/memory"
        _ = try MemoryFile.write(memory, to: path, id: id)
        let restored = try MemoryFile.map(chain: [path], id: id)
        #expect(try contents(restored) == contents(memory))

        // Only that chunk maps the file; the other 14 MiB are anonymous.
        let maps = try OwnedFileDescriptor.readSmallTextFile("/proc/self/maps")
        let base = UInt64(UInt(bitPattern: restored.regions[0].hostAddress))
        let fileMappings = maps.split(separator: "\n").filter { $0.hasSuffix(path) }.compactMap { line -> (UInt64, UInt64)? in
            let bounds = line.split(separator: " ")[0].split(separator: "-").compactMap { UInt64($0, radix: 16) }
            return bounds.count == 2 && bounds[0] >= base && bounds[1] <= base + (16 << 20) ? (bounds[0] - base, bounds[1] - bounds[0]) : nil
        }
        #expect(fileMappings.count == 1 && fileMappings.first! == (4 << 20, 2 << 20), "\(fileMappings)")

        // Both kinds take writes privately: the file keeps the snapshot.
        try restored.write(UInt64(0x1122_3344), at: GuestAddress(1 << 20))
        try restored.write(UInt64(0x5566_7788), at: GuestAddress((6 << 20) - 8))
        #expect(try restored.read(UInt64.self, at: GuestAddress(1 << 20)) == 0x1122_3344)
        let again = try MemoryFile.map(chain: [path], id: id)
        #expect(try again.read(UInt64.self, at: GuestAddress(1 << 20)) == 0)
        #expect(try again.read(UInt64.self, at: GuestAddress((6 << 20) - 8)) == 0x5A5A_5A5A_5A5A_5A5A)
    }

    @Test func mappedRunsCoverEveryChunkWithDataAndNothingElse() {
        let mib: UInt64 = 1 << 20
        // A region of 9 MiB at file offset 4096 (after the header page); data ranges are file offsets.
        let header: UInt64 = 4096
        func runs(_ data: [Range<UInt64>]) -> [Range<UInt64>] {
            MemoryFile.mappedRuns(data: data, regionOffset: header, regionSize: 9 * mib)
        }
        #expect(runs([]) == [])
        #expect(runs([0..<header]) == [], "the header is not guest memory")
        #expect(runs([header..<header + 4096]) == [0..<2 * mib])
        #expect(runs([header + 2 * mib - 1..<header + 2 * mib + 1]) == [0..<4 * mib], "a range across a boundary maps both chunks")
        #expect(runs([header + mib..<header + mib + 1, header + 3 * mib..<header + 3 * mib + 1]) == [0..<4 * mib], "adjacent chunks merge")
        #expect(runs([header + mib..<header + mib + 1, header + 7 * mib..<header + 7 * mib + 1]) == [0..<2 * mib, 6 * mib..<8 * mib])
        #expect(runs([header + 8 * mib + 4096..<header + 20 * mib]) == [8 * mib..<9 * mib], "the last chunk stops at the region's end")
    }

    @Test func truncatedForeignAndExistingFilesAreRefused() throws {
        let dir = TemporaryDirectory()
        let memory = try patterned()
        let id = try SnapshotID.random()
        let path = dir.path + "/memory"
        _ = try MemoryFile.write(memory, to: path, id: id)
        #expect { try MemoryFile.write(memory, to: path, id: id) } throws: { ($0 as! SwiftletError).code == .systemCall || ($0 as! SwiftletError).message.contains("exists") }

        #expect(truncate(path, off_t(4096 + (64 << 10))) == 0)
        #expect { try MemoryFile.map(chain: [path], id: id) } throws: {
            let message = ($0 as! SwiftletError).message
            return message.contains("truncated") && message.contains("expected \(4096 + (96 << 10))")
        }
        let foreign = dir.write("foreign", [UInt8](repeating: 7, count: 8192))
        #expect { try MemoryFile.read(foreign) } throws: { ($0 as! SwiftletError).message.contains("not a Swiftlet snapshot memory file") }
        var header = try OwnedFileDescriptor.readSmallFile(path)
        header[8] = 9
        let future = dir.write("future", header)
        #expect { try MemoryFile.read(future) } throws: { ($0 as! SwiftletError).message.contains("version 9") }
    }

    @Test func snapshotIDsAreHexInJSON() throws {
        let id = SnapshotID(bytes: Array(0..<16))
        #expect(id.description == "000102030405060708090a0b0c0d0e0f")
        let bytes = try StateFile.encode([id])
        #expect(try StateFile.decode([SnapshotID].self, from: bytes, path: "s") == [id])
    }
}

/// Memory-file headers from a hostile snapshot: sizes and addresses that overflow are refused
/// when the header is read (two regions of 2^63 bytes trapped the process before).
@Suite struct HostileMemoryFileTests {
    let dir = TemporaryDirectory()

    /// A header page declaring `regions`, with the derived fields as given, and `extra` bytes after it.
    func write(_ regions: [(UInt64, UInt64)], declared: [UInt64] = [0, 0, 0, 0, 0], extra: Int = 0) throws -> String {
        var h = MemoryFile.magic + LittleEndian.bytes(1, 4) + LittleEndian.bytes(0, 4) + [UInt8](repeating: 7, count: 16)
        h += [UInt8](repeating: 0, count: 16) + LittleEndian.bytes(4096, 4) + LittleEndian.bytes(UInt64(regions.count), 4)
        for field in declared { h += LittleEndian.bytes(field, 8) }
        for (start, size) in regions { h += LittleEndian.bytes(start, 8) + LittleEndian.bytes(size, 8) }
        h += [UInt8](repeating: 0, count: 4096 - h.count + extra)
        let path = dir.path + "/memory"
        let fd = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600, what: path)
        try h.withBytes { b throws(SwiftletError) in try fd.write(from: b, at: 0, what: path) }
        return path
    }

    func refused(_ path: String, saying text: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(sourceLocation: sourceLocation) { try MemoryFile.read(path) } throws: {
            let message = ($0 as! SwiftletError).message
            if !message.contains(text) { Issue.record("message: \(message)", sourceLocation: sourceLocation) }
            return message.contains(text)
        }
    }

    @Test func overflowingRegionsAreRefused() throws {
        refused(try write([(0, 1 << 63), (1 << 63, 1 << 63)]), saying: "addresses or sizes overflow")
        refused(try write([(0, 0xFFFF_FFFF_FFFF_F000), (0x1_0000_0000_0000, 0x2000)]), saying: "addresses or sizes overflow")
        refused(try write([(0xFFFF_FFFF_FFFF_F000, 0x2000)]), saying: "addresses or sizes overflow")
        refused(try write([(0, 0x2000), (0x1000, 0x1000)]), saying: "overlap or are out of order")
        refused(try write([(0x10000, 0x1000), (0, 0x1000)]), saying: "overlap or are out of order")
        // A consistent header whose file is short is still only "truncated".
        let good: [UInt64] = [0, 0, 4096, 0x2000, 4096 + 0x2000]
        refused(try write([(0, 0x2000)], declared: good), saying: "truncated")
        #expect(try MemoryFile.read(try write([(0, 0x2000)], declared: good, extra: 0x2000)).dataBytes == 0x2000)
    }
}
