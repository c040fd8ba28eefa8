import CLinux
import Glibc

/// Monotonic time in nanoseconds, and the moment the process's own code started.
public enum MonotonicClock {
    /// CLOCK_MONOTONIC now.
    @inlinable public static var now: UInt64 { swiftlet_monotonic_ns() }

    /// CLOCK_MONOTONIC when the process's first constructor ran, before Swift's runtime and main.
    public static var processStart: UInt64 { swiftlet_process_start_ns() }

    /// Milliseconds between two readings, as a Double.
    public static func milliseconds(from start: UInt64, to end: UInt64) -> Double {
        Double(end &- start) / 1_000_000
    }

    /// Sleeps for `nanoseconds` (nanosleep, resumed after a signal).
    public static func sleep(nanoseconds: UInt64) {
        var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}
