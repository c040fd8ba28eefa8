import CLinux
import Glibc

/// How a helper process ended.
public enum HelperExit: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    init(waitStatus status: Int32) {
        if swiftlet_wait_signaled(status) != 0 {
            self = .signaled(swiftlet_wait_term_signal(status))
        } else {
            self = .exited(swiftlet_wait_exit_status(status))
        }
    }

    public var description: String {
        switch self {
        case .exited(let status): "exited with status \(status)"
        case .signaled(let signal): "killed by signal \(signal)"
        }
    }
}

/// A helper program (passt) run by a thread of its own that lives exactly as long as the
/// helper: the thread forks and executes it (`swiftlet_spawn_helper`), then waits for it and
/// reaps it. The child asks for SIGKILL when that thread ends (PR_SET_PDEATHSIG, which belongs
/// to the forking *thread*, not the process), so it never outlives this process, however this
/// process ends (`kill -9` included), and never dies early because a short-lived thread started
/// it. A helper that changes its credentials (passt started as root drops to `nobody`) loses
/// PR_SET_PDEATHSIG: the kernel clears it on a change of user; such a helper must end by another
/// path (passt ends when its socket's other end closes, as it does with this process).
///
/// The only place that forks, executes, signals and reaps processes this way. Start helpers
/// before the process confines itself (`Confinement`): the VMM's filter refuses fork and
/// execve, and allows only what `stop` and the waiting thread need (kill with SIGKILL, waitid,
/// wait4).
public final class HelperProcess: Sendable {
    private enum Phase {
        case starting
        case failed(SwiftletError)
        case running(Int32)
        case ended(Int32, HelperExit)
    }

    /// The helper's process id (still taken until the helper has been reaped).
    public let pid: Int32
    public let name: String
    private let phase: ConditionLock<Phase>

    private init(pid: Int32, name: String, phase: ConditionLock<Phase>) {
        self.pid = pid
        self.name = name
        self.phase = phase
    }

    /// Starts `executable` with `arguments` (without the program name, which is `executable`)
    /// and `environment` (KEY=VALUE). The child's descriptor i is `descriptors[i]` of this
    /// process (0, 1, 2 its standard streams, then more), and it gets no other descriptor; the
    /// caller keeps its own and closes them when it likes (they are not used after this returns).
    /// In a session of its own when `newSession` (a terminal's Ctrl-C does not reach it). Returns
    /// once the child has executed `executable`; throws if it could not (`.notFound` for a
    /// missing executable).
    public static func start(_ executable: String, arguments: [String], environment: [String] = [],
                             descriptors: [Int32], newSession: Bool = true, name: String) throws(SwiftletError) -> HelperProcess {
        guard descriptors.count >= 3, descriptors.count <= 16, descriptors.allSatisfy({ $0 >= 0 }) else {
            throw SwiftletError(.invalidArgument, "a helper gets 3 to 16 descriptors, its standard streams first")
        }
        let phase = ConditionLock<Phase>(.starting)
        let argv = [executable] + arguments
        let thread = try OSThread.start(name: name) {
            let cArguments = argv.map { strdup($0) } + [nil]
            let cEnvironment = environment.map { strdup($0) } + [nil]
            let pid = descriptors.withUnsafeBufferPointer { fds in
                swiftlet_spawn_helper(executable, cArguments, cEnvironment, fds.baseAddress, Int32(fds.count), SIGKILL, newSession ? 1 : 0)
            }
            let spawnErrno = currentErrno
            cArguments.forEach { free($0) }
            cEnvironment.forEach { free($0) }
            guard pid > 0 else {
                let error: SwiftletError
                switch spawnErrno {
                case .noSuchFileOrDirectory: error = SwiftletError(.notFound, "cannot start \(name): \(executable) does not exist", cause: spawnErrno)
                case .permissionDenied: error = SwiftletError(.permissionDenied, "cannot start \(name): \(executable) is not executable", cause: spawnErrno)
                default: error = SwiftletError.system("cannot start \(name) (\(executable))", errno: spawnErrno)
                }
                phase.withLock { $0 = .failed(error) }
                return
            }
            phase.withLock { $0 = .running(pid) }
            // This thread stays until the helper ends (its death signal is tied to this thread).
            // Wait without reaping, then reap with the lock held: `signal` (under the lock) never
            // reaches a process that took over a reaped pid.
            let waited = swiftlet_wait_exited(pid)
            phase.withLock { state in
                let status = swiftlet_reap(pid)
                let exit = waited == 0 && status >= 0 ? HelperExit(waitStatus: status) : .exited(-1)
                state = .ended(pid, exit)
            }
        }
        thread.detach()
        let started: Result<Int32, SwiftletError> = phase.wait(until: { if case .starting = $0 { false } else { true } }) { state in
            switch state {
            case .starting: fatalError("unreachable")
            case .failed(let error): .failure(error)
            case .running(let pid), .ended(let pid, _): .success(pid)
            }
        }!
        return HelperProcess(pid: try started.get(), name: name, phase: phase)
    }

    /// How the helper ended; nil while it runs.
    public var exit: HelperExit? {
        phase.withLock { state in
            if case .ended(_, let exit) = state { return exit }
            return nil
        }
    }

    /// Waits until the helper has ended (and been reaped), at most `timeoutNanoseconds` when
    /// given; returns how it ended, or nil on timeout.
    @discardableResult
    public func waitForExit(timeoutNanoseconds: UInt64? = nil) -> HelperExit? {
        phase.wait(until: { if case .ended = $0 { true } else { false } }, timeoutNanoseconds: timeoutNanoseconds) { state in
            if case .ended(_, let exit) = state { return exit }
            return nil
        } ?? nil
    }

    /// Sends SIGKILL to the helper unless it has already ended.
    public func kill() {
        phase.withLock { state in
            if case .running(let pid) = state { _ = swiftlet_kill(pid, SIGKILL) }
        }
    }

    /// Kills the helper (SIGKILL) and waits until it has been reaped; returns how it ended. Idempotent.
    @discardableResult
    public func stop() -> HelperExit {
        kill()
        return waitForExit()!
    }
}

extension OwnedFileDescriptor {
    /// A new anonymous file in memory (memfd, close-on-exec), named `name` in /proc: somewhere
    /// for a helper's standard output and error.
    public static func memoryFile(name: String) throws(SwiftletError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try systemCall("cannot create a memory file for \(name)") { swiftlet_memfd(name) })
    }
}
