import SwiftletSystem
import Testing
@testable import MachineState

@Suite struct WorkingSetTests {
    let id = SnapshotID(bytes: Array(1...16))
    var sample: WorkingSet { try! WorkingSet(snapshot: id, pageCount: 131_072, runs: [0..<3, 512..<1024, 131_071..<131_072]) }

    @Test func roundTrips() throws {
        let bytes = sample.encode()
        #expect(Array(bytes.prefix(8)) == Array("SWLTWSET".utf8))
        #expect(bytes.count == WorkingSet.headerSize + 3 * 16)
        let back = try WorkingSet.decode(bytes, path: "ws", snapshot: id, pageCount: 131_072)
        #expect(back == sample)
        #expect(back.pages == 3 + 512 + 1)
        let empty = try WorkingSet(snapshot: id, pageCount: 16, runs: [])
        #expect(try WorkingSet.decode(empty.encode(), path: "ws", snapshot: id, pageCount: 16) == empty)
    }

    @Test func runsMustBeSortedApartAndInside() {
        for runs: [Range<Int>] in [[5..<9, 2..<3], [0..<4, 4..<6], [0..<4, 3..<6], [10..<17], [3..<3]] {
            #expect(throws: SwiftletError.self, "\(runs)") { try WorkingSet(snapshot: id, pageCount: 16, runs: runs) }
        }
    }

    @Test func everyFlippedByteIsRefused() throws {
        let bytes = sample.encode()
        for index in bytes.indices {
            var broken = bytes
            broken[index] ^= 0x04
            #expect(throws: SwiftletError.self, "byte \(index)") { try WorkingSet.decode(broken, path: "ws", snapshot: id, pageCount: 131_072) }
        }
    }

    @Test func otherSnapshotsSizesVersionsAndTruncationsAreRefused() throws {
        let bytes = sample.encode()
        func message(_ bytes: [UInt8], snapshot: SnapshotID? = nil, pageCount: Int = 131_072) -> String {
            do {
                _ = try WorkingSet.decode(bytes, path: "ws", snapshot: snapshot ?? id, pageCount: pageCount)
                return "accepted"
            } catch { return error.message }
        }
        #expect(message(bytes, snapshot: SnapshotID(bytes: Array(repeating: 7, count: 16))).contains("another snapshot"))
        #expect(message(bytes, pageCount: 65_536).contains("131072 pages"))
        #expect(message(Array(bytes.dropLast(3))).contains("truncated"))
        #expect(message(bytes + [0]).contains("truncated"))
        #expect(message(Array(bytes.prefix(40))).contains("not a Swiftlet working-set file"))
        var other = bytes
        other[8] = 9
        #expect(message(other).contains("version 9"))
        // A run past the end, with a checksum that matches it.
        let outside = try WorkingSet(snapshot: id, pageCount: 1 << 20, runs: [1000..<(1 << 20)]).encode()
        var patched = outside
        patched.replaceSubrange(28..<36, with: LittleEndian.bytes(1024, 8))
        #expect(message(patched, pageCount: 1024).contains("outside guest memory"))
    }
}
