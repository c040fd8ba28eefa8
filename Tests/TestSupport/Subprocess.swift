import CLinux
import Glibc

/// Runs a program and collects its exit status, stdout and stderr (for CLI and integration tests).
public struct Subprocess: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    /// Runs `arguments` (argv[0] is a path) with `environment` added to the current one. After
    /// `timeout` seconds the process is killed (status 137, and stderr says so).
    public static func run(_ arguments: [String], environment: [String: String] = [:], stdin: String? = nil,
                           timeout: Double? = nil) -> Subprocess {
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0], inPipe: [Int32] = [0, 0]
        // Close-on-exec: a child another thread spawns meanwhile (a registry left running) must not
        // inherit these ends, or the reads below would never see the end of the stream.
        _ = closeOnExecPipe(&outPipe); _ = closeOnExecPipe(&errPipe); _ = closeOnExecPipe(&inPipe)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        for fd in inPipe + outPipe + errPipe { posix_spawn_file_actions_addclose(&actions, fd) }

        var env = [String: String]()
        var e = environ
        while let entry = e.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            e += 1
        }
        env.merge(environment) { $1 }
        let envStrings = env.map { "\($0.key)=\($0.value)" }

        var pid = pid_t()
        let cArgs = arguments.map { strdup($0) } + [nil]
        let cEnv = envStrings.map { strdup($0) } + [nil]
        // Children start with no blocked signals and default dispositions: a test runner's worker
        // thread blocks most signals, and a shell that inherits a blocked SIGCHLD never returns
        // from `wait`.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        var empty = sigset_t(), all = sigset_t()
        sigemptyset(&empty)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        defer { posix_spawnattr_destroy(&attributes) }
        let spawned = posix_spawn(&pid, arguments[0], &actions, &attributes, cArgs, cEnv)
        cArgs.forEach { free($0) }
        cEnv.forEach { free($0) }
        posix_spawn_file_actions_destroy(&actions)
        close(inPipe[0]); close(outPipe[1]); close(errPipe[1])
        guard spawned == 0 else {
            close(inPipe[1]); close(outPipe[0]); close(errPipe[0])
            return Subprocess(status: 127, stdout: "", stderr: "cannot spawn \(arguments[0]): errno \(spawned)")
        }
        if let stdin {
            var s = stdin
            s.withUTF8 { b in _ = Glibc.write(inPipe[1], b.baseAddress, b.count) }
        }
        close(inPipe[1])

        // Read both pipes without deadlocking on a full one.
        var out: [UInt8] = [], err: [UInt8] = []
        var fds = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0), pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        var open = 2
        var buffer = [UInt8](repeating: 0, count: 65536)
        var timedOut = false
        let deadline = timeout.map { now() + $0 }
        while open > 0 {
            var wait: Int32 = -1
            if let deadline {
                let left = deadline - now()
                if left <= 0 {
                    if !timedOut { kill(pid, SIGKILL); timedOut = true }
                    wait = 1000
                } else {
                    wait = Int32(left * 1000) + 1
                }
            }
            _ = poll(&fds, 2, wait)
            for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(fds[i].fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if i == 0 { out += buffer[0..<n] } else { err += buffer[0..<n] }
                } else {
                    close(fds[i].fd)
                    fds[i].fd = -1
                    open -= 1
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code: Int32 = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        if timedOut { err += Array("\n[killed after \(timeout!) s]\n".utf8) }
        return Subprocess(status: code, stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self))
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// pipe(2) with both ends close-on-exec (pipe2 with O_CLOEXEC): tests run in parallel, and a
/// child another test spawns must not inherit a pipe end (its reader would never see the end).
/// Returns 0, or -1 with errno set.
public func closeOnExecPipe(_ fds: inout [Int32]) -> Int32 {
    fds.withUnsafeMutableBufferPointer { swiftlet_pipe($0.baseAddress!) }
}
