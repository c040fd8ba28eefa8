import Synchronization

/// A result that arrives once, from another thread or task, with a descriptor that becomes
/// readable when it has (and stays readable): for waiting on it with `Poll` beside other
/// descriptors (a signalfd, say).
public final class PendingResult<Success: Sendable>: Sendable {
    private let slot = Mutex<Result<Success, SwiftletError>?>(nil)
    private let event: EventFD

    public init() throws(SwiftletError) {
        event = try EventFD(nonBlocking: true)
    }

    /// Readable once the result is set.
    public var ended: Int32 { event.rawValue }

    /// The result, nil until it is set.
    public var result: Result<Success, SwiftletError>? { slot.withLock { $0 } }

    /// Sets the result (the first one set stays) and makes `ended` readable.
    public func set(_ result: Result<Success, SwiftletError>) {
        let first = slot.withLock { value in
            guard value == nil else { return false }
            value = result
            return true
        }
        if first { event.signal() }
    }

    /// Waits until the result is set, and returns it.
    public func wait() -> Result<Success, SwiftletError> {
        while true {
            if let result { return result }
            // Only a broken descriptor makes poll fail; the result is set before `ended` is readable.
            _ = try? Poll.waitReadable(ended)
        }
    }
}

/// Blocking work on a thread of its own (an `OSThread`) whose end can be waited for with `Poll`
/// (`ended` becomes readable) or `wait()`, which returns the work's result.
public final class WorkerThread<Success: Sendable>: Sendable {
    private let thread: OSThread
    private let pending: PendingResult<Success>
    private let joined = Mutex<Bool>(false)

    /// Starts `body` on a new thread named `name`.
    public init(name: String, stackSize: Int = 512 << 10, _ body: @escaping @Sendable () throws(SwiftletError) -> Success) throws(SwiftletError) {
        let pending = try PendingResult<Success>()
        self.pending = pending
        thread = try OSThread.start(name: name, stackSize: stackSize) {
            pending.set(Result { () throws(SwiftletError) in try body() })
        }
    }

    /// Readable once the work has ended.
    public var ended: Int32 { pending.ended }

    /// Whether the work has ended (its result is there).
    public var hasEnded: Bool { pending.result != nil }

    /// Interrupts a blocking system call of the work (it returns EINTR), as `OSThread.interrupt`.
    public func interrupt() { thread.interrupt() }

    /// Waits for the work to end and the thread to finish, and returns the work's result.
    @discardableResult
    public func wait() -> Result<Success, SwiftletError> {
        joined.withLock { joined in
            if !joined { thread.join() }
            joined = true
        }
        return pending.result!
    }
}

extension OSThread {
    /// Runs `body` on a new thread named `name` and returns its result: the calling task is
    /// suspended meanwhile, so blocking work (a pause that waits for vCPUs, a snapshot's writes)
    /// never occupies one of Swift concurrency's cooperative threads.
    public static func run<Success: Sendable>(name: String, stackSize: Int = 512 << 10,
                                              _ body: @escaping @Sendable () throws(SwiftletError) -> Success) async throws(SwiftletError) -> Success {
        let result: Result<Success, SwiftletError> = await withCheckedContinuation { continuation in
            do throws(SwiftletError) {
                try OSThread.start(name: name, stackSize: stackSize) {
                    continuation.resume(returning: Result { () throws(SwiftletError) in try body() })
                }.detach()
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get()
    }
}
