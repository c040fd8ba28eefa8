import Glibc

extension OwnedFileDescriptor {
    /// The parts of the file's first `size` bytes that the filesystem holds data for, in order and
    /// merged (SEEK_DATA / SEEK_HOLE); everything else is a hole and reads as zeros. A filesystem
    /// that cannot tell holes reports the whole file as data.
    public func dataRanges(size: UInt64) throws(SwiftletError) -> [Range<UInt64>] {
        let seekData: Int32 = 3, seekHole: Int32 = 4
        var ranges: [Range<UInt64>] = []
        var offset: UInt64 = 0
        while offset < size {
            let start = lseek(rawValue, off_t(offset), seekData)
            if start < 0 {
                if errno == ENXIO { break } // no data after offset
                throw SwiftletError.system("cannot find the data in a sparse file", errno: currentErrno)
            }
            if UInt64(start) >= size { break }
            let end = lseek(rawValue, start, seekHole)
            if end < 0 { throw SwiftletError.system("cannot find the holes in a sparse file", errno: currentErrno) }
            ranges.appendMerging(UInt64(start)..<min(UInt64(end), size))
            offset = UInt64(end)
        }
        return ranges
    }
}

extension Array {
    /// Appends `range` to ranges sorted by their start, merged with the last one if they touch
    /// or overlap; an empty range is dropped.
    public mutating func appendMerging<Bound: Comparable>(_ range: Range<Bound>) where Element == Range<Bound> {
        guard !range.isEmpty else { return }
        if let last = self.last, range.lowerBound <= last.upperBound {
            self[count - 1] = last.lowerBound..<Swift.max(last.upperBound, range.upperBound)
        } else {
            append(range)
        }
    }
}
