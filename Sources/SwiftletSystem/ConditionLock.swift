import Glibc

/// A mutex with a condition variable (pthread), for threads that must sleep until another thread
/// changes some shared state: vCPU threads parked while their machine is paused, say.
public final class ConditionLock<State>: @unchecked Sendable {
    // SAFETY (Sendable): `state` is only touched with `mutex` held.
    private var state: State
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init(_ initial: State) {
        state = initial
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    /// Runs `body` with the lock held and wakes every waiter afterwards (the state may have changed).
    public func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(condition)
            pthread_mutex_unlock(mutex)
        }
        return try body(&state)
    }

    /// Sleeps until `done(state)` holds or `timeoutNanoseconds` pass, then runs `body` with the lock
    /// held. Returns nil on timeout.
    public func wait<R>(until done: (State) -> Bool, timeoutNanoseconds: UInt64? = nil, _ body: (inout State) -> R) -> R? {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(condition)
            pthread_mutex_unlock(mutex)
        }
        var deadline = timespec()
        if let timeoutNanoseconds {
            let end = MonotonicClock.now + timeoutNanoseconds
            deadline = timespec(tv_sec: Int(end / 1_000_000_000), tv_nsec: Int(end % 1_000_000_000))
        }
        while !done(state) {
            if timeoutNanoseconds != nil {
                if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT && !done(state) { return nil }
            } else {
                pthread_cond_wait(condition, mutex)
            }
        }
        return body(&state)
    }
}
