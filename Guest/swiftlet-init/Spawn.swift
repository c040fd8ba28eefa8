import AgentProtocol
import CGuestSupport
import Glibc

/// A running command: its process and the host-side ends of its standard streams.
struct RunningCommand {
    let pid: pid_t
    /// Where its input goes (a pipe, or the pty controller), nil once closed.
    var input: Int32?
    /// Its output and error (the pty controller carries both; `error` is then nil).
    var output: Int32?
    var error: Int32?
    let terminal: Bool
    var status: Int32?
}

enum Spawn {
    static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    /// Starts `request`; on failure returns the status and message a shell would give.
    static func start(_ request: ExecRequest) -> Result<RunningCommand, SpawnFailure> {
        guard let name = request.arguments.first, !name.isEmpty else { return .failure(SpawnFailure(status: 127, message: "no command given")) }
        let environment = makeEnvironment(request)
        let path = environment.first { $0.hasPrefix("PATH=") }.map { String($0.dropFirst(5)) } ?? defaultPath
        guard let program = resolve(name, path: path) else {
            return .failure(SpawnFailure(status: 127, message: "\(name): command not found"))
        }
        let identity: Identity
        switch Identity.parse(request.user) {
        case .success(let id): identity = id
        case .failure(let failure): return .failure(failure)
        }

        // Everything the child needs is prepared here: it shares this process's memory until it
        // has exec'd (guest_spawn), and only makes system calls.
        var streams: (input: [Int32], output: [Int32], error: [Int32]) = ([-1, -1], [-1, -1], [-1, -1])
        var controller: Int32 = -1, terminal: Int32 = -1
        if request.terminal {
            guard guest_open_pty(&controller, &terminal, request.rows, request.columns) == 0 else {
                return .failure(SpawnFailure(status: 126, message: "cannot open a pseudo-terminal"))
            }
        } else {
            guard guest_pipe(&streams.input) == 0, guest_pipe(&streams.output) == 0, guest_pipe(&streams.error) == 0 else {
                return .failure(SpawnFailure(status: 126, message: "cannot create pipes"))
            }
        }
        let argv = request.arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        let programC = strdup(program)!
        let directory = request.workingDirectory.isEmpty ? "/" : request.workingDirectory
        let directoryC = strdup(directory)!
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
            free(programC); free(directoryC)
        }
        var spawn = guest_spawn_request()
        spawn.path = UnsafePointer(programC)
        spawn.directory = UnsafePointer(directoryC)
        (spawn.input, spawn.output, spawn.error) = request.terminal ? (terminal, terminal, terminal)
                                                                    : (streams.input[0], streams.output[1], streams.error[1])
        spawn.terminal = request.terminal ? 1 : 0
        spawn.change_identity = request.user.isEmpty ? 0 : 1
        spawn.uid = identity.uid
        spawn.gid = identity.gid
        let pid = argv.withUnsafeBufferPointer { a in
            envp.withUnsafeBufferPointer { e in
                spawn.arguments = a.baseAddress
                spawn.environment = e.baseAddress
                return guest_spawn(&spawn)
            }
        }
        let spawnErrno = errno
        if request.terminal { close(terminal) } else { close(streams.input[0]); close(streams.output[1]); close(streams.error[1]) }
        func closeHostEnds() {
            if request.terminal { close(controller) } else { close(streams.input[1]); close(streams.output[0]); close(streams.error[0]) }
        }
        guard pid > 0 else {
            closeHostEnds()
            return .failure(SpawnFailure(status: 126, message: "cannot start \(name): \(String(cString: strerror(spawnErrno)))"))
        }
        if spawn.failed_step != 0 {
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            closeHostEnds()
            let why = String(cString: strerror(spawn.failed_errno))
            switch spawn.failed_step {
            case Int32(GUEST_SPAWN_DIRECTORY):
                return .failure(SpawnFailure(status: 126, message: "cannot change to the working directory \(directory): \(why)"))
            case Int32(GUEST_SPAWN_IDENTITY):
                return .failure(SpawnFailure(status: 126, message: "cannot run as user \(request.user): \(why)"))
            default:
                return .failure(SpawnFailure(status: spawn.failed_errno == ENOENT ? 127 : 126, message: "\(name): \(why)"))
            }
        }
        if request.terminal {
            setNonBlocking(controller)
            return .success(RunningCommand(pid: pid, input: controller, output: controller, error: nil, terminal: true))
        }
        setNonBlocking(streams.input[1]); setNonBlocking(streams.output[0]); setNonBlocking(streams.error[0])
        return .success(RunningCommand(pid: pid, input: streams.input[1], output: streams.output[0], error: streams.error[0], terminal: false))
    }

    /// The command's environment: the image's and the user's variables, with PATH, HOME and TERM
    /// defaulted as a container runtime would.
    static func makeEnvironment(_ request: ExecRequest) -> [String] {
        var environment = request.environment
        func has(_ name: String) -> Bool { environment.contains { $0.hasPrefix(name + "=") } }
        if !has("PATH") { environment.append("PATH=" + defaultPath) }
        if !has("HOME") { environment.append("HOME=/root") }
        if !has("HOSTNAME") {
            var name = [CChar](repeating: 0, count: 256)
            gethostname(&name, 255)
            environment.append("HOSTNAME=" + String(cString: name))
        }
        if request.terminal && !has("TERM") { environment.append("TERM=xterm") }
        return environment
    }

    /// Finds `name` on `path` as execvp would; a name with a slash is used as it is.
    static func resolve(_ name: String, path: String) -> String? {
        if name.contains("/") { return access(name, F_OK) == 0 ? name : nil }
        for dir in path.split(separator: ":") {
            let candidate = (dir.isEmpty ? "." : String(dir)) + "/" + name
            var info = stat()
            if stat(candidate, &info) == 0 && info.st_mode & S_IFMT == S_IFREG && access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    static func setNonBlocking(_ fd: Int32) { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
}

struct SpawnFailure: Error {
    let status: Int32
    let message: String
}

/// Who the command runs as: `""` (root), `uid`, `uid:gid`, `name` or `name:group`, names looked
/// up in the image's /etc/passwd and /etc/group.
struct Identity {
    var uid: uid_t
    var gid: gid_t

    static func parse(_ user: String) -> Result<Identity, SpawnFailure> {
        if user.isEmpty { return .success(Identity(uid: 0, gid: 0)) }
        let parts = user.split(separator: ":", maxSplits: 1).map(String.init)
        let passwd = table("/etc/passwd")
        var uid: uid_t, gid: gid_t
        if let numeric = uid_t(parts[0]) {
            uid = numeric
            gid = passwd.first { $0.count > 3 && $0[2] == parts[0] }.flatMap { gid_t($0[3]) } ?? numeric
        } else if let entry = passwd.first(where: { $0.count > 3 && $0[0] == parts[0] }), let u = uid_t(entry[2]), let g = gid_t(entry[3]) {
            uid = u; gid = g
        } else {
            return .failure(SpawnFailure(status: 126, message: "unable to find user \(parts[0]): no matching entries in passwd file"))
        }
        if parts.count == 2 {
            if let numeric = gid_t(parts[1]) {
                gid = numeric
            } else if let entry = table("/etc/group").first(where: { $0.count > 2 && $0[0] == parts[1] }), let g = gid_t(entry[2]) {
                gid = g
            } else {
                return .failure(SpawnFailure(status: 126, message: "unable to find group \(parts[1]): no matching entries in group file"))
            }
        }
        return .success(Identity(uid: uid, gid: gid))
    }

    static func table(_ path: String) -> [[String]] {
        guard let text = try? readText(path) else { return [] }
        return text.split(separator: "\n").map { $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init) }
    }
}
