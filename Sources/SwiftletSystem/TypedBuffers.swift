extension Array where Element == UInt8 {
    /// `withUnsafeMutableBytes` for bodies that throw `SwiftletError` (the standard one rethrows
    /// untyped errors).
    public mutating func withMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> R) throws(SwiftletError) -> R {
        let result: Result<R, SwiftletError> = withUnsafeMutableBytes { b in Result { () throws(SwiftletError) in try body(b) } }
        return try result.get()
    }

    /// `withUnsafeBytes` for bodies that throw `SwiftletError`.
    public func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws(SwiftletError) -> R) throws(SwiftletError) -> R {
        let result: Result<R, SwiftletError> = withUnsafeBytes { b in Result { () throws(SwiftletError) in try body(b) } }
        return try result.get()
    }
}
