import Glibc

/// Processes Swiftlet starts (SwiftletKit's `spawnChild`: mke2fs, swiftlet-pull, a machine's VMM
/// process): waiting for a child of this process, and signalling one (a machine's VMM process
/// may be another invocation's child). Helpers that must die with this process are `HelperProcess`.
public enum ChildProcess {
    /// Waits until child `pid` has ended and reaps it; a signal meanwhile does not end the wait.
    /// Returns its wait status (0: it exited with status 0), or -1 when it cannot be waited for
    /// (not a child of this process, or reaped already).
    @discardableResult
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return -1 }
        }
        return status
    }

    /// Sends `signal` to `pid`; false when it could not (gone, or not this process's to signal).
    @discardableResult
    public static func signal(_ pid: pid_t, _ signal: Int32) -> Bool {
        kill(pid, signal) == 0
    }
}
