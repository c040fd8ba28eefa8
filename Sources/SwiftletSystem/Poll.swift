import Glibc

/// Waiting for a few descriptors to become readable (poll(2)), for loops that relay between
/// sockets, pipes, signalfds and eventfds. (Many descriptors, watched for long: `Epoll`.)
public enum Poll {
    /// Waits until at least one of `descriptors` is ready to read, that is readable, at end of
    /// file or hung up, or failed (a read will not wait), or until `timeoutMilliseconds` pass
    /// (nil or negative: no limit; 0: only looks). A signal does not end the wait early: it goes on
    /// until the same deadline. Negative descriptors are left out (never ready), as poll(2) does.
    /// Returns, for each descriptor, whether it is ready: all false when the time ran out.
    public static func wait(_ descriptors: [Int32], timeoutMilliseconds: Int? = nil) throws(SwiftletError) -> [Bool] {
        guard let timeoutMilliseconds, timeoutMilliseconds >= 0 else { return try wait(descriptors, deadline: nil) }
        return try wait(descriptors, deadline: MonotonicClock.now + UInt64(timeoutMilliseconds) * 1_000_000)
    }

    /// `wait(_:timeoutMilliseconds:)` until `deadline`, a `MonotonicClock.now` reading (nil: no limit).
    public static func wait(_ descriptors: [Int32], deadline: UInt64?) throws(SwiftletError) -> [Bool] {
        var waits = descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        while true {
            var timeout: Int32 = -1
            if let deadline {
                let now = MonotonicClock.now
                // Rounded up, so the wait never ends before the deadline.
                timeout = now >= deadline ? 0 : Int32(min(UInt64(Int32.max), (deadline - now + 999_999) / 1_000_000))
            }
            // SAFETY: poll writes only the `count` entries of the buffer it is given.
            let n = waits.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeout) }
            if n > 0 { return waits.map { $0.revents != 0 } }
            if n < 0 {
                if errno == EINTR { continue }
                throw SwiftletError.system("cannot wait for descriptors \(descriptors)", errno: currentErrno)
            }
            if timeout == 0 { return [Bool](repeating: false, count: descriptors.count) }
        }
    }

    /// Waits for one descriptor: true once it is ready to read, false when the time ran out.
    public static func waitReadable(_ descriptor: Int32, timeoutMilliseconds: Int? = nil) throws(SwiftletError) -> Bool {
        try wait([descriptor], timeoutMilliseconds: timeoutMilliseconds)[0]
    }
}
