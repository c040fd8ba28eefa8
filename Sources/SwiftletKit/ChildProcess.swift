import CLinux
import Glibc
import Images
import SwiftletSystem

/// Where a child's standard descriptor comes from.
public enum ChildStream: Sendable {
    case null
    /// A file, created or truncated (output) or read (input).
    case file(String)
    /// A descriptor of this process, duplicated.
    case descriptor(Int32)
}

/// glibc's POSIX_SPAWN_SETSID (2.26 and later), which <spawn.h> hides without _GNU_SOURCE.
private let spawnSetSID: Int32 = 0x80

/// Starts `arguments[0]` (`executable`) with no blocked signals and default dispositions (the CLI
/// blocks the signals it forwards, and a child must not inherit that), optionally in a session of
/// its own. Returns the child's pid.
public func spawnChild(_ executable: String, arguments: [String], environment: [String] = currentEnvironment(),
                input: ChildStream = .null, output: ChildStream, error: ChildStream,
                newSession: Bool = false, what: String) throws(SwiftletError) -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    for (fd, stream) in [(Int32(0), input), (1, output), (2, error)] {
        switch stream {
        case .null: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
        case .file(let path): posix_spawn_file_actions_addopen(&actions, fd, path, fd == 0 ? O_RDONLY : O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o600)
        case .descriptor(let source): posix_spawn_file_actions_adddup2(&actions, source, fd)
        }
    }
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var empty = sigset_t(), all = sigset_t()
    sigemptyset(&empty)
    sigfillset(&all)
    posix_spawnattr_setsigmask(&attributes, &empty)
    posix_spawnattr_setsigdefault(&attributes, &all)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | (newSession ? spawnSetSID : 0)))
    let cArguments = arguments.map { strdup($0) } + [nil]
    let cEnvironment = environment.map { strdup($0) } + [nil]
    defer { cArguments.forEach { free($0) }; cEnvironment.forEach { free($0) } }
    var pid = pid_t()
    let result = posix_spawn(&pid, executable, &actions, &attributes, cArguments, cEnvironment)
    guard result == 0 else { throw SwiftletError(.systemCall, "cannot start \(what): \(String(cString: strerror(result)))") }
    return pid
}

/// This process's environment, as KEY=VALUE strings, with `SWIFTLET_HOME` set to the home in use
/// (`SwiftletHome.path`): a process Swiftlet starts works in the same store, whether the home came
/// from the environment or from `SwiftletHome.use`.
public func currentEnvironment() -> [String] {
    var environment: [String] = []
    var entry = environ
    while let pointer = entry.pointee { environment.append(String(cString: pointer)); entry += 1 }
    return environment.filter { !$0.hasPrefix(SwiftletHome.variable + "=") } + [SwiftletHome.variable + "=" + SwiftletHome.path]
}

/// Where Swiftlet keeps its state: the image store, machines (`machines/`), boot templates
/// (`templates/`) and background runs (`runs/`).
public enum SwiftletHome {
    static let variable = "SWIFTLET_HOME"

    /// The home in use: the one given to `use`, else `$SWIFTLET_HOME`, else
    /// `$XDG_DATA_HOME/swiftlet`, else `~/.local/share/swiftlet`.
    public static var path: String { ImageStore.defaultRoot() }

    /// Makes `path` the home for the rest of this process (nil: back to the environment's). Call
    /// it before any other work; the processes Swiftlet starts (machines' VMM processes, pulls)
    /// are given it.
    public static func use(_ path: String?) {
        ImageStore.useDefaultRoot(path)
    }
}

/// Reads the next forwarded signal from the signalfd `signals`: Ctrl-C, SIGTERM, SIGHUP and SIGQUIT
/// stop the work (after `beforeThrowing`) with an `.interrupted` error naming the signal; others
/// (SIGWINCH) are ignored here.
func throwIfInterrupted(_ signals: Int32, beforeThrowing: () -> Void = {}) throws(SwiftletError) {
    guard let signal = SignalFD.next(from: signals), signal == SIGINT || signal == SIGTERM || signal == SIGHUP || signal == SIGQUIT else { return }
    beforeThrowing()
    throw SwiftletError.interrupted(by: signal)
}
