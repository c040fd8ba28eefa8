import CLinux
import Glibc

/// A signalfd(2): signals blocked in the thread that made it, read as data instead of delivered
/// to handlers (the CLI forwards SIGINT, SIGTERM and SIGWINCH to the guest this way). A class:
/// its descriptor is used by number (polled, passed to sessions) long after the last use of the
/// value, so it must live to the end of its owner's scope, not end at its last use as a
/// noncopyable value may (that closed the descriptor early, and its number was reused).
public final class SignalFD: Sendable {
    public let descriptor: OwnedFileDescriptor

    /// Blocks `signals` in the calling thread (threads it starts afterwards inherit the mask) and
    /// returns a non-blocking signalfd that receives them: make it before starting other threads,
    /// or those threads may take the signals instead.
    public init(blocking signals: [Int32]) throws(SwiftletError) {
        // SAFETY: the shim reads `count` signal numbers from the buffer.
        let fd = signals.withUnsafeBufferPointer { swiftlet_signalfd($0.baseAddress, Int32($0.count)) }
        guard fd >= 0 else { throw SwiftletError.system("cannot create a signalfd", errno: currentErrno) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    public var rawValue: Int32 { descriptor.rawValue }

    /// The next pending signal's number; nil when none is pending (it does not wait).
    public func next() -> Int32? { Self.next(from: descriptor.rawValue) }

    /// `next()` for a signalfd this value does not own.
    public static func next(from fd: Int32) -> Int32? {
        while true {
            Glibc.errno = 0
            let signal = swiftlet_read_signal(fd)
            if signal > 0 { return signal }
            if Glibc.errno == EINTR { continue }
            return nil
        }
    }
}
