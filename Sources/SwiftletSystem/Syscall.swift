import Glibc
import SystemPackage

/// Runs a system call that returns -1 and sets errno on failure, retrying on EINTR.
@inlinable
public func retryingOnInterrupt<T: FixedWidthInteger>(_ body: () -> T) -> Result<T, Errno> {
    while true {
        let result = body()
        if result != -1 { return .success(result) }
        let error = Errno(rawValue: Glibc.errno)
        if error == .interrupted { continue }
        return .failure(error)
    }
}

/// Runs a system call that returns -1 and sets errno on failure, retrying on EINTR, and throws
/// a `SwiftletError` naming `what` if it fails.
@inlinable
@discardableResult
public func systemCall<T: FixedWidthInteger>(_ what: @autoclosure () -> String, _ body: () -> T) throws(SwiftletError) -> T {
    switch retryingOnInterrupt(body) {
    case .success(let value): return value
    case .failure(let errno): throw SwiftletError.system(what(), errno: errno)
    }
}

/// The current thread's errno as a typed value.
@inlinable
public var currentErrno: Errno { Errno(rawValue: Glibc.errno) }
