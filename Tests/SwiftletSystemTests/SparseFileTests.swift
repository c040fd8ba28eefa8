import Glibc
import SwiftletSystem
import Testing

@Suite struct SparseFileTests {
    @Test func rangesMergeWhenTheyTouchOrOverlap() {
        var ranges: [Range<UInt64>] = []
        for range in [0..<10, 10..<20, 15..<18, 30..<30, 40..<50, 45..<60] as [Range<UInt64>] { ranges.appendMerging(range) }
        #expect(ranges == [0..<20, 40..<60])
    }

    @Test func dataRangesAreWhatWasWrittenAndNotTheHoles() throws {
        var template = Array("/tmp/swiftlet-sparse.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        #expect(fd >= 0)
        unlink(template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
        let file = OwnedFileDescriptor(taking: fd)
        #expect(ftruncate(fd, 16 << 20) == 0)
        #expect(try file.dataRanges(size: 16 << 20).isEmpty, "a new sparse file is all hole")
        try file.write([UInt8](repeating: 1, count: 4096), at: 4 << 20, what: "test file")
        try file.write([UInt8](repeating: 2, count: 8192), at: 12 << 20, what: "test file")
        let ranges = try file.dataRanges(size: 16 << 20)
        #expect(ranges.count == 2)
        #expect(ranges.first?.contains(4 << 20) == true && ranges.last?.contains((12 << 20) + 8191) == true)
        #expect(ranges.reduce(0) { $0 + $1.count } < 1 << 20, "the holes are not data: \(ranges)")
        #expect(try file.dataRanges(size: 8 << 20).count == 1, "only ranges within the size asked for")
    }
}
