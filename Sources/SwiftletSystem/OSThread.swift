import CLinux
import Glibc

/// A dedicated OS thread (pthread), for work that blocks in the kernel, such as KVM_RUN, and must
/// never occupy one of Swift concurrency's cooperative threads.
public final class OSThread: @unchecked Sendable {
    // SAFETY (Sendable): `handle` is written once by `start` before any other thread can see the
    // object; afterwards it is only read.
    private var handle = pthread_t()
    private let body: @Sendable () -> Void
    public let name: String

    /// The signal used to knock a thread out of a blocking system call (its handler does nothing).
    public static let wakeupSignal: Int32 = swiftlet_sigrtmin() + 1

    private static let installWakeup: Void = {
        _ = swiftlet_install_wakeup_signal(OSThread.wakeupSignal)
    }()

    private init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }

    /// Starts `body` on a new thread named `name` (the kernel shows the first 15 bytes).
    public static func start(name: String, stackSize: Int = 512 << 10, _ body: @escaping @Sendable () -> Void) throws(SwiftletError) -> OSThread {
        _ = installWakeup
        let thread = OSThread(name: name, body: body)
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setstacksize(&attributes, stackSize)
        // SAFETY: the retained reference is balanced by takeRetainedValue in the thread's entry.
        let context = Unmanaged.passRetained(thread).toOpaque()
        let result = pthread_create(&thread.handle, &attributes, { raw in
            let thread = Unmanaged<OSThread>.fromOpaque(raw!).takeRetainedValue()
            let shortName = String(thread.name.utf8.prefix(15))!
            swiftlet_set_thread_name(shortName)
            _ = swiftlet_unblock_signal(OSThread.wakeupSignal)
            thread.body()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<OSThread>.fromOpaque(context).release()
            throw SwiftletError(.systemCall, "cannot start thread \(name)", cause: .init(rawValue: result))
        }
        return thread
    }

    /// Interrupts a blocking system call on this thread (it returns EINTR).
    public func interrupt() {
        pthread_kill(handle, OSThread.wakeupSignal)
    }

    /// Waits for the thread to finish.
    public func join() {
        pthread_join(handle, nil)
    }

    /// Lets the thread's resources go when it finishes, for a thread nobody joins (call `join` or
    /// this, once).
    public func detach() {
        pthread_detach(handle)
    }
}
