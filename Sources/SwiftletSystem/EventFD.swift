import CLinux
import Glibc

/// An eventfd(2) counter: a cheap cross-thread (and, through KVM, guest-to-host) wakeup.
public struct EventFD: ~Copyable, Sendable {
    public let descriptor: OwnedFileDescriptor

    public init(nonBlocking: Bool = true) throws(SwiftletError) {
        let flags = Int32(EFD_CLOEXEC) | (nonBlocking ? Int32(EFD_NONBLOCK) : 0)
        let fd = try systemCall("cannot create an eventfd") { eventfd(0, flags) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    public var rawValue: Int32 { descriptor.rawValue }

    /// Adds 1 to the counter, waking any waiter.
    public func signal() {
        var one: UInt64 = 1
        _ = retryingOnInterrupt { Glibc.write(descriptor.rawValue, &one, 8) }
    }

    /// Reads and resets the counter; returns 0 when it was already 0 (non-blocking mode).
    @discardableResult
    public func drain() -> UInt64 {
        var value: UInt64 = 0
        switch retryingOnInterrupt({ Glibc.read(descriptor.rawValue, &value, 8) }) {
        case .success: return value
        case .failure: return 0
        }
    }
}
