import ArgumentParser
import CLinux
import FoundationEssentials
import Glibc
import Images
import SwiftletSystem
import VMM

struct MachineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "machine",
        abstract: "Long-lived machines: create, start, exec, stop; their writes survive a stop.",
        discussion: """
            A machine has a name, an image, and a writable disk of its own for everything written \
            inside it. A started machine runs in a VMM process of its own (no daemon), reached through \
            a control socket in its directory, $SWIFTLET_HOME/machines/NAME.

              swiftlet machine create --name web --image alpine:3.20 --memory 512
              swiftlet machine start web
              swiftlet machine exec web -- sh -c 'echo hello > /srv/greeting'
              swiftlet machine stop web && swiftlet machine start web
              swiftlet machine exec web -- cat /srv/greeting
              swiftlet machine snapshot web -o web.snap      # and: machine restore web.snap --name web2
              swiftlet machine fork --from web --name w --count 4   # w-1 ... w-4, from web as it is now
              swiftlet machine rm -f web
            """,
        subcommands: [Create.self, Start.self, Stop.self, Status.self, List.self, Remove.self, Exec.self, Shell.self, Copy.self,
                      Pause.self, Resume.self, SnapshotCommand.self, Restore.self, Fork.self, Serve.self])
}

/// A machine named by its argument or by --name.
struct MachineNameOptions: ParsableArguments {
    @Argument(help: "The machine's name (or --name).")
    var positionalName: String?

    @Option(help: "The machine's name.")
    var name: String?

    func validate() throws {
        if positionalName != nil && name != nil && positionalName != name {
            throw ValidationError("give the machine's name once: as an argument or with --name")
        }
        if positionalName == nil && name == nil { throw ValidationError("which machine? Give its name (or --name NAME)") }
    }

    var value: String { name ?? positionalName ?? "" }

    func directory() throws(SwiftletError) -> MachineDirectory { try MachineDirectory(name: value) }
}

extension MachineCommand {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a machine from an image (not started).")

        @Option(help: "The machine's name: letters, digits, '-', '_', '.'; it is also the guest's hostname.")
        var name: String

        @OptionGroup var source: RootOptions

        @Option(help: "Guest kernel: an ELF vmlinux or a bzImage (default: the one `make kernel` built).")
        var kernel: String?

        @Option(help: "Number of vCPUs.")
        var cpus: Int = 1

        @Option(help: "Guest memory in MiB.")
        var memory: Int = 256

        @Option(help: "Size of the machine's writable disk in MiB (sparse: it takes what is written).")
        var diskSize: Int = 2048

        func validate() throws {
            if cpus < 1 || cpus > MachineConfig.maximumCPUs { throw ValidationError("--cpus must be 1 to \(MachineConfig.maximumCPUs)") }
            if memory < MachineConfig.minimumMemoryMiB { throw ValidationError("--memory must be at least \(MachineConfig.minimumMemoryMiB) MiB") }
            if diskSize < 64 || diskSize > 16 << 20 { throw ValidationError("--disk-size must be 64 MiB to 16 TiB") }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in try create() }
        }

        func create() throws(SwiftletError) {
            let directory = try MachineDirectory(name: name)
            try MachineDirectory.withLock { () throws(SwiftletError) in
                try directory.makeNew()
                do throws(SwiftletError) {
                    var root = try RootFilesystem.resolve(image: source.image, rootfs: source.rootfs.map(absolute), insecure: source.insecureRegistry,
                                                             policy: source.pull, signals: -1)
                    root.disks = root.disks.map(absolute)
                    guard root.disks.count < MachineConfig.maximumDisks else {
                        throw SwiftletError(.unsupported, "\(source.image ?? "the image") needs \(root.disks.count) layer disks: a machine has room for \(MachineConfig.maximumDisks - 1) beside its own disk")
                    }
                    if let kernel, access(kernel, R_OK) != 0 { throw SwiftletError(.notFound, "no kernel at \(kernel)") }
                    try Self.makeWritableDisk(directory.diskPath, megabytes: diskSize)
                    try directory.writeRecord(MachineRecord(
                        name: name, source: source.image ?? source.rootfs ?? "default", layers: root.disks, defaults: root.defaults, cpus: cpus,
                        memoryMiB: memory, kernel: kernel.map(absolute), diskMiB: diskSize, created: Int(time(nil))))
                } catch {
                    try? MachineDirectory.removeTree(directory.path)
                    throw error
                }
            }
            printError("created machine \(name) (\(source.image ?? source.rootfs ?? "default image"), \(cpus) vCPU, \(memory) MiB, \(diskSize) MiB disk)")
        }

        /// A sparse file formatted as ext4 by e2fsprogs' mke2fs, owned by whoever runs Swiftlet.
        static func makeWritableDisk(_ path: String, megabytes: Int) throws(SwiftletError) {
            // e2fsprogs' (busybox has an mke2fs that makes ext2 only, often on PATH).
            let candidates = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
            guard let mke2fs = candidates.first(where: { access($0, X_OK) == 0 }) else {
                throw SwiftletError(.notFound, "cannot format the machine's disk: mke2fs was not found (install e2fsprogs)")
            }
            let file = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: path)
            guard ftruncate(file.rawValue, off_t(megabytes) << 20) == 0 else {
                throw SwiftletError.system("cannot size \(path)", errno: currentErrno)
            }
            let pid = try spawnChild(mke2fs, arguments: ["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-L", "swiftlet-rw",
                                                         "-E", "lazy_itable_init=1,lazy_journal_init=1", path],
                                     output: .null, error: .descriptor(2), what: "mke2fs")
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            guard status == 0 else { throw SwiftletError(.systemCall, "mke2fs could not format the machine's disk (status \(status))") }
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a machine in a VMM process of its own; returns once its agent is ready.")

        @OptionGroup var machine: MachineNameOptions

        @Option(help: ArgumentHelp("Give up if the machine is not ready after this long.", valueName: "duration"))
        var timeout: String = "120s"

        func validate() throws {
            if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 30s") }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in try start() }
        }

        func start() throws(SwiftletError) {
            let directory = try machine.directory()
            _ = try directory.record()
            switch directory.state {
            case .running: throw SwiftletError(.invalidArgument, "machine \(directory.name) is already running")
            case .crashed(let pid):
                printError("machine \(directory.name)'s last VMM process (pid \(pid)) ended without stopping the machine; starting it again")
            case .stopped: break
            }
            try MachineLifecycle.Launch(directory).waitUntilReady(milliseconds: Run.milliseconds(timeout) ?? 120_000, timeout: timeout)
            printError("started machine \(directory.name)")
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Shut a machine down cleanly; stop it by force after --timeout.")

        @OptionGroup var machine: MachineNameOptions

        @Option(help: ArgumentHelp("How long the guest gets to shut down before it is stopped by force.", valueName: "duration"))
        var timeout: String = "10s"

        func validate() throws {
            if timeout != "0", Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 10s") }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let directory = try machine.directory()
                _ = try directory.record()
                try MachineLifecycle.stop(directory, timeoutMilliseconds: timeout == "0" ? 0 : Run.milliseconds(timeout) ?? 10_000)
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Show whether a machine runs, and how its last run ended.")

        @OptionGroup var machine: MachineNameOptions

        @Flag(help: "Print as JSON.")
        var json = false

        func run() throws {
            let summary = try exitingOnSetupFailure { () throws(SwiftletError) in
                let directory = try machine.directory()
                return try MachineSummary(directory, record: try directory.record())
            }
            if json { print(try MachineSummary.json(summary)) } else { print(summary.text) }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List machines.")

        @Flag(help: "Print as JSON.")
        var json = false

        func run() throws {
            let summaries = MachineDirectory.all().compactMap { directory in
                (try? directory.record()).map { MachineSummary(directory, record: $0) }
            }
            if json {
                print(try MachineSummary.json(summaries))
                return
            }
            let rows = [["NAME", "STATE", "IMAGE", "CPUS", "MEMORY"]] + summaries.map { [$0.name, $0.state, $0.image, "\($0.cpus)", "\($0.memoryMiB) MiB"] }
            let widths = (0..<5).map { column in rows.map { $0[column].count }.max() ?? 0 }
            for row in rows {
                print(row.enumerated().map { $0.offset == 4 ? $0.element : $0.element.padding(to: widths[$0.offset] + 2) }.joined())
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove a stopped machine and its disk (-f: stop it first).")

        @OptionGroup var machine: MachineNameOptions

        @Flag(name: .shortAndLong, help: "Stop the machine by force if it runs.")
        var force = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let directory = try machine.directory()
                guard directory.exists || (force && access(directory.path, F_OK) == 0) else { _ = try directory.record(); return }
                if case .running = directory.state {
                    guard force else {
                        throw SwiftletError(.invalidArgument, "machine \(directory.name) is running: stop it first (`swiftlet machine stop \(directory.name)`) or use `rm -f`")
                    }
                    try MachineLifecycle.stop(directory, timeoutMilliseconds: 0, quiet: true)
                }
                try MachineDirectory.withLock { () throws(SwiftletError) in
                    // The machine's own lock, held while its directory goes: a `start` racing this
                    // removal finds it taken (its VMM process does not run) instead of booting a
                    // machine whose directory disappears under it.
                    let held = try directory.lockStopped()
                    try directory.remove()
                    _ = held
                    MachineDirectory.removeUnusedForkBases()
                }
                printError("removed machine \(directory.name)")
            }
        }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a running machine: its vCPUs stop and its devices go quiet.")
        @OptionGroup var machine: MachineNameOptions
        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                _ = try MachineLifecycle.request(try machine.directory(), ControlRequest(.pause))
            }
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused machine.")
        @OptionGroup var machine: MachineNameOptions
        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                _ = try MachineLifecycle.request(try machine.directory(), ControlRequest(.resume))
            }
        }
    }

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "serve",
            abstract: "Run a machine's VMM process (started by `machine start`).", shouldDisplay: false)

        @Argument var name: String

        @Option(help: "Restore this snapshot instead of booting; the machine is a new copy and gets a new identity.")
        var from: String?

        @Flag(help: "Track the restored machine's writes, so that its next snapshot can be a diff.")
        var diffable = false

        func run() throws {
            let directory = try exitingOnSetupFailure { () throws(SwiftletError) in try MachineDirectory(name: name) }
            throw ExitCode(MachineServer.serve(directory, ready: 1, from: from, diffable: diffable))
        }
    }
}

/// Starting a machine's VMM process, talking to it, and stopping it.
enum MachineLifecycle {
    /// A VMM process being started (`swiftlet machine serve`), in a session of its own; it says
    /// `ready` on a pipe once the guest agent answers, or why it could not start.
    struct Launch {
        let directory: MachineDirectory
        let pid: pid_t
        let answer: Int32

        /// Starts the process; `from`: the snapshot to restore instead of booting, `diffable`:
        /// whether the restored machine tracks its writes for a diff snapshot of that snapshot.
        init(_ directory: MachineDirectory, from snapshot: String? = nil, diffable: Bool = false) throws(SwiftletError) {
            var ends: [Int32] = [0, 0]
            guard swiftlet_pipe(&ends) == 0 else { throw SwiftletError.system("cannot create a pipe", errno: currentErrno) }
            let executable = GuestAssets.resolve("/proc/self/exe") ?? CommandLine.arguments[0]
            var arguments = ["swiftlet", "machine", "serve", directory.name]
            if let snapshot { arguments += ["--from", snapshot] + (diffable ? ["--diffable"] : []) }
            do {
                pid = try spawnChild(executable, arguments: arguments,
                                     output: .descriptor(ends[1]), error: .file(directory.logPath), newSession: true,
                                     what: "the machine's VMM process")
            } catch {
                close(ends[0]); close(ends[1])
                throw error
            }
            close(ends[1])
            self.directory = directory
            self.answer = ends[0]
        }

        /// Waits for the process's answer; the process is killed if it gives none in time.
        func waitUntilReady(milliseconds: Int, timeout: String) throws(SwiftletError) {
            defer { close(answer) }
            let text = Self.readAll(answer, milliseconds: milliseconds).map(trimmed)
            if text == "ready" { return }
            guard let text else {
                kill(pid, SIGKILL)
                throw SwiftletError(.guestFailure, "machine \(directory.name) was not ready within \(timeout); its console is in \(directory.consolePath)")
            }
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            if text.hasPrefix("error: ") { throw SwiftletError(.guestFailure, String(text.dropFirst(7))) }
            throw SwiftletError(.guestFailure, "the machine's VMM process ended before the machine was ready:\n" + directory.logTail())
        }

        /// Everything readable from `fd` until its end; nil if it does not end in time.
        static func readAll(_ fd: Int32, milliseconds: Int) -> String? {
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 4096)
            let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
            while true {
                let now = MonotonicClock.now
                guard now < deadline else { return nil }
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let n = poll(&p, 1, Int32(min(Int(Int32.max), Int((deadline - now) / 1_000_000) + 1)))
                if n < 0 && errno != EINTR { return nil }
                if n <= 0 { continue }
                let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { return String(decoding: bytes, as: UTF8.self) }
                bytes += chunk[0..<count]
                // The answer is one line; the process goes on running with the pipe redirected.
                if bytes.contains(0x0A) { return String(decoding: bytes, as: UTF8.self) }
            }
        }
    }

    /// Sends one request and returns the reply; a clear error when the machine does not run.
    /// `passing`: descriptors that go with the request (an `exec`'s streams).
    static func request(_ directory: MachineDirectory, _ request: ControlRequest, passing fds: [Int32] = []) throws(SwiftletError) -> ControlReply {
        let channel = try connect(directory)
        try channel.send(request, passing: fds)
        guard let (reply, fds) = try channel.receive(ControlReply.self) else {
            throw SwiftletError(.guestFailure, "machine \(directory.name)'s VMM process closed the control connection without answering")
        }
        fds.forEach { close($0) }
        if let error = reply.error { throw SwiftletError(.invalidArgument, error) }
        return reply
    }

    static func connect(_ directory: MachineDirectory) throws(SwiftletError) -> ControlChannel {
        _ = try directory.record()
        if let channel = ControlChannel.connect(directory.socketPath) { return channel }
        switch directory.state {
        case .running: throw SwiftletError(.invalidArgument, "machine \(directory.name) is starting or not answering on \(directory.socketPath)")
        case .crashed(let pid): throw SwiftletError(.guestFailure, crashReport(directory, pid: pid))
        case .stopped: throw SwiftletError(.invalidArgument, "machine \(directory.name) is not running: start it with `swiftlet machine start \(directory.name)`")
        }
    }

    static func crashReport(_ directory: MachineDirectory, pid: Int32) -> String {
        let tail = directory.logTail()
        return "machine \(directory.name) crashed: its VMM process (pid \(pid)) ended without stopping the machine"
            + (tail.isEmpty ? "" : "; its log (\(directory.logPath)) ends:\n" + tail)
    }

    /// Stops the machine: a clean shutdown, by force after `timeoutMilliseconds`; waits until its
    /// VMM process has ended (killing it if it does not end on its own).
    static func stop(_ directory: MachineDirectory, timeoutMilliseconds: Int, quiet: Bool = false) throws(SwiftletError) {
        switch directory.state {
        case .stopped:
            if !quiet { printError("machine \(directory.name) is not running") }
            return
        case .crashed(let pid):
            printError(crashReport(directory, pid: pid))
            unlink(directory.pidPath)
            unlink(directory.socketPath)
            return
        case .running(let pid):
            var request = ControlRequest(.stop)
            request.timeoutMilliseconds = timeoutMilliseconds
            let asked = (try? Self.request(directory, request)) != nil
            // The VMM process releases the lock as it exits.
            if !waitUntilStopped(directory, milliseconds: asked ? timeoutMilliseconds + 10_000 : 0), pid > 0 {
                kill(pid, SIGKILL)
                guard waitUntilStopped(directory, milliseconds: 5_000) else {
                    throw SwiftletError(.systemCall, "machine \(directory.name)'s VMM process (pid \(pid)) did not end")
                }
                unlink(directory.pidPath)
                unlink(directory.socketPath)
                try? OwnedFileDescriptor.writeSmallFileAtomically(directory.lastExitPath, Array("killed: the VMM process did not stop\n".utf8))
            }
            if !quiet { printError("machine \(directory.name) " + (directory.lastExit ?? "stopped")) }
        }
    }

    static func waitUntilStopped(_ directory: MachineDirectory, milliseconds: Int) -> Bool {
        let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
        while true {
            if case .running = directory.state {} else { return true }
            if MonotonicClock.now >= deadline { return false }
            usleep(10_000)
        }
    }
}

/// What `status` and `ls` show.
struct MachineSummary: Codable {
    var name: String
    var state: String
    var image: String
    var cpus: Int
    var memoryMiB: Int
    var diskMiB: Int
    var pid: Int32?
    var uptimeMilliseconds: Int?
    var lastExit: String?
    var problem: String?

    init(_ directory: MachineDirectory, record: MachineRecord) {
        name = record.name; image = record.source; cpus = record.cpus; memoryMiB = record.memoryMiB; diskMiB = record.diskMiB
        lastExit = directory.lastExit
        switch directory.state {
        case .stopped: state = "stopped"
        case .crashed(let pid):
            state = "crashed"
            problem = MachineLifecycle.crashReport(directory, pid: pid)
        case .running(let pid):
            self.pid = pid
            if let reply = try? MachineLifecycle.request(directory, ControlRequest(.status)) {
                state = reply.state ?? "running"
                uptimeMilliseconds = reply.uptimeMilliseconds
            } else {
                state = "starting"
            }
        }
    }

    var text: String {
        var lines = ["name: \(name)", "state: \(state)", "image: \(image)", "cpus: \(cpus)", "memory: \(memoryMiB) MiB", "disk: \(diskMiB) MiB"]
        if let pid { lines.append("pid: \(pid)") }
        if let uptimeMilliseconds { lines.append("uptime: \(format(Double(uptimeMilliseconds) / 1000, digits: 1)) s") }
        if let lastExit, state == "stopped" { lines.append("last run: \(lastExit)") }
        if let problem { lines.append(problem) }
        return lines.joined(separator: "\n")
    }

    static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}

/// `path` made absolute (relative to the working directory), for a record read from anywhere.
func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : GuestAssets.resolve(path) ?? path
}
