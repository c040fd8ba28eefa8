import AgentProtocol
import Glibc
import MachineState
import Synchronization
import SwiftletSystem
import VMM

/// A persistent machine's VMM process (`swiftlet machine serve NAME`, started by `machine start`):
/// holds the machine's lock, boots it with its writable disk, and serves the control socket until
/// the guest stops. Each control connection gets a thread; each `exec` a session of its own with
/// the guest agent (`openSession`), so commands run side by side.
public enum MachineServer {
    /// The arguments (after the program's name) that start a machine's VMM process:
    /// `machine serve NAME [--from DIR [--diffable]]`. The `swiftlet` CLI answers them, and so
    /// must any program that embeds this library and starts machines (`serveIfAsked`).
    public static let invocation = ["machine", "serve"]

    /// The program started as a machine's VMM process: this one.
    static var executable: String { (try? FileTree.currentExecutable()) ?? CommandLine.arguments[0] }

    /// For a program that embeds this library: when `arguments` (without the program's name)
    /// start a machine's VMM process, runs it and returns its exit status; otherwise nil. Call
    /// it first thing in `main`, before any thread starts.
    public static func serveIfAsked(_ arguments: [String] = Array(CommandLine.arguments.dropFirst())) -> Int32? {
        guard arguments.starts(with: invocation), arguments.count >= invocation.count + 1 else { return nil }
        var rest = Array(arguments.dropFirst(invocation.count + 1))
        var from: String?
        var diffable = false
        var receiving: Receiving?
        while let argument = rest.first {
            rest.removeFirst()
            switch argument {
            case "--from" where !rest.isEmpty: from = rest.removeFirst()
            case "--diffable": diffable = true
            case "--receive" where !rest.isEmpty:
                // The listening socket is standard input, the token in the environment (taken out at once).
                guard let milliseconds = Int(rest.removeFirst()), let token = getenv(Receiving.tokenVariable).map({ String(cString: $0) }) else {
                    return ExitStatus.setupFailed
                }
                unsetenv(Receiving.tokenVariable)
                receiving = Receiving(listener: 0, token: token, timeoutMilliseconds: milliseconds)
            default: return ExitStatus.setupFailed
            }
        }
        guard let directory = try? MachineDirectory(name: arguments[invocation.count]) else { return ExitStatus.setupFailed }
        return serve(directory, ready: 1, from: from, diffable: diffable, receiving: receiving)
    }

    /// A VMM process that takes its machine from a migration (`machine receive`): the socket it
    /// listens on, the token the source must hold, and how long it waits for one.
    public struct Receiving: Sendable {
        static let tokenVariable = "SWIFTLET_MIGRATION_TOKEN"
        public var listener: Int32
        public var token: String
        public var timeoutMilliseconds: Int
    }

    /// Runs the machine. `ready` (the `start` process's pipe) is told `ready` once the agent
    /// answers, or why the machine could not start. Returns the process's exit status.
    /// `from`: a snapshot to restore instead of booting (`machine restore`, `machine fork`): the
    /// guest continues from there and is told its new identity (hostname, random seed).
    public static func serve(_ directory: MachineDirectory, ready: Int32, from snapshot: String? = nil, diffable: Bool = false,
                             receiving: Receiving? = nil) -> Int32 {
        Glibc.signal(SIGPIPE, SIG_IGN)
        // SIGTERM and SIGINT ask for a clean stop, as `machine stop` does.
        let signals = try? SignalFD(blocking: [SIGTERM, SIGINT, SIGHUP])
        defer { withExtendedLifetime(signals) {} }
        func tell(_ text: String) {
            var line = text + "\n"
            line.withUTF8 { _ = try? OwnedFileDescriptor.writeAll(fd: ready, UnsafeRawBufferPointer($0)) }
            // Nobody waits for more: the descriptor becomes /dev/null so the `start` process sees its end.
            if let null = try? OwnedFileDescriptor.open("/dev/null", flags: O_WRONLY) { dup2(null.rawValue, ready) }
        }
        let record: MachineRecord?, lock: OwnedFileDescriptor
        do {
            // Before any other thread starts: no thread of a VMM process keeps a root's capabilities.
            try Confinement.dropCapabilities()
            // An arriving machine's record comes with it.
            record = receiving == nil ? try directory.record() : nil
            lock = try OwnedFileDescriptor.open(directory.lockPath, flags: O_RDWR | O_CREAT, mode: 0o600, what: directory.lockPath)
        } catch {
            tell("error: " + error.description)
            return ExitStatus.setupFailed
        }
        guard flock(lock.rawValue, LOCK_EX | LOCK_NB) == 0 else {
            tell("error: machine \(directory.name) is already running")
            return ExitStatus.setupFailed
        }
        do {
            let outcome = try run(directory, record: record, signals: signals?.rawValue ?? -1, from: snapshot, diffable: diffable,
                                  receiving: receiving, ready: { tell("ready") })
            writeLastExit(directory, outcome.text)
            cleanUp(directory)
            if outcome.text == movedAway {
                // The machine runs elsewhere now: this copy must never start again, whether or not
                // `machine migrate` lives to remove the directory (a directory without a record is
                // a leftover that the next `create` of the name clears).
                try? FileTree.rename(directory.recordPath, to: directory.recordPath + ".moved")
            }
            _ = lock
            return outcome.status
        } catch {
            tell("error: " + error.description)
            log(error.description)
            writeLastExit(directory, "could not start: " + error.description)
            cleanUp(directory)
            return ExitStatus.setupFailed
        }
    }

    /// How a machine's run ends when it moved to another host (`migrate`).
    static let movedAway = "moved to another host"

    private static func writeLastExit(_ directory: MachineDirectory, _ text: String) {
        try? OwnedFileDescriptor.writeSmallFileAtomically(directory.lastExitPath, Array((text + "\n").utf8))
    }

    private static func cleanUp(_ directory: MachineDirectory) {
        unlink(directory.socketPath)
        unlink(directory.pidPath)
        // A machine that arrived by migration ran from this snapshot; it starts from its disk next time.
        if access(directory.migratedPath, F_OK) == 0 { SnapshotDirectory(directory.migratedPath).remove() }
    }

    /// The machine's config: its image's layers read-only, its own disk writable under them.
    static func config(_ record: MachineRecord, directory: MachineDirectory, console: Int32) throws(SwiftletError) -> MachineConfig {
        let root = RootFilesystem(disks: record.layers, defaults: record.defaults, name: record.source)
        var config = try root.agentMachineConfig(kernel: record.kernel, cpus: record.cpus, memoryMiB: record.memoryMiB,
                                                 allowPVM: false, consoleOutput: console, cpuTemplate: record.cpuTemplate)
        let upper = RootFilesystem.deviceName(record.layers.count)
        config.commandLine += " swiftlet.upper=\(upper) swiftlet.hostname=\(record.name)"
        config.disks.append(DiskConfig(path: directory.diskPath, readOnly: false, base: record.diskBase))
        if let volumes = record.volumes, !volumes.isEmpty {
            try VolumeMount.validate(volumes) // a directory removed since: a clear error, not a guest without it
            config.share(volumes)
        }
        return config
    }

    private static func run(_ directory: MachineDirectory, record given: MachineRecord?, signals: Int32, from snapshot: String?,
                            diffable: Bool, receiving: Receiving?, ready: () -> Void) throws(SwiftletError) -> (status: Int32, text: String) {
        try OwnedFileDescriptor.writeSmallFileAtomically(directory.pidPath, Array("\(getpid())\n".utf8))
        unlink(directory.socketPath)
        let listener = try UnixSocket.listen(at: directory.socketPath)
        // Served until the run ends (`serve` gets its raw descriptor).
        defer { withExtendedLifetime(listener) {} }
        let console = try OwnedFileDescriptor.open(directory.consolePath, flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600,
                                                   what: directory.consolePath)
        // A noncopyable value may end at its last use: the guest writes to the console until the run ends.
        defer { withExtendedLifetime(console) {} }
        let port = try InProcessPort(port: AgentPort.number)
        let record: MachineRecord, network: MachineNetwork?, vm: Machine
        var incoming: IncomingMigration?
        if let receiving {
            let arrived = try receive(directory, receiving, console: console.rawValue, port: port)
            (vm, record, network, incoming) = (arrived.migration.machine, arrived.record, arrived.network, arrived.migration)
        } else if let given {
            record = given
            // The machine's own passt (its log in the machine's directory), ended with this process.
            network = try record.network.flatMap { policy throws(SwiftletError) in
                policy.hasNetwork ? try MachineNetwork(policy: policy, logFile: directory.passtLogPath) : nil
            }
            vm = try make(directory, record: record, from: snapshot, diffable: diffable, console: console.rawValue, port: port,
                          nic: network?.device(log: log))
        } else {
            throw SwiftletError(.invalidArgument, "machine \(directory.name) has no record")
        }
        defer { network?.stop() }
        return try serve(directory, vm: vm, record: record, network: network, port: port, signals: signals, listener: listener.rawValue,
                         newIdentity: snapshot != nil, incoming: incoming, ready: ready)
    }

    /// The machine of `record`, booted, or restored from `snapshot`.
    private static func make(_ directory: MachineDirectory, record: MachineRecord, from snapshot: String?, diffable: Bool,
                             console: Int32, port: InProcessPort, nic: NetworkDeviceConfig?) throws(SwiftletError) -> Machine {
        if let snapshot {
            // The snapshot's writable disk is the machine's own disk, already copied (restore) or
            // shared copy-on-write (fork) by the command that made the machine.
            // Its volumes are the record's (this host's user chose them for it, or for the machine it was forked from).
            let volumes = record.volumes ?? []
            try VolumeMount.validate(volumes)
            return try Machine.restoring(from: snapshot, consoleOutput: console, vsockPorts: port, diffable: diffable,
                                         writableDisks: [DiskConfig(path: directory.diskPath, base: record.diskBase)],
                                         readOnlyDisks: SnapshotPaths.resolver(trusting: record, pack: access(directory.packPath, F_OK) == 0 ? directory.packPath : nil),
                                         network: nic, volumes: VolumeMount.shared(volumes))
        }
        var config = try config(record, directory: directory, console: console)
        config.network = nic
        return Machine(config: config, vsockPorts: port)
    }

    /// Waits for the source of a migration on `receiving`'s listener (connections that do not
    /// hold the token are refused and logged, and the wait goes on), receives the machine into
    /// `migratedPath`, restores it with its disk moved to the machine's own and its record
    /// written, and starts its network once the source let go. The record is the source's,
    /// checked as any snapshot's (layers and kernel found on this host by digest).
    private static func receive(_ directory: MachineDirectory, _ receiving: Receiving, console: Int32, port: InProcessPort)
        throws(SwiftletError) -> (migration: IncomingMigration, record: MachineRecord, network: MachineNetwork?) {
        let token = try MigrationChannel.token(fromText: receiving.token)
        let deadline = MonotonicClock.now + UInt64(max(0, receiving.timeoutMilliseconds)) * 1_000_000
        var connection: OwnedFileDescriptor
        var channel: MigrationChannel
        while true {
            guard let accepted = try TCPSocket.accept(receiving.listener, deadline: deadline) else {
                throw SwiftletError(.guestFailure, "no migration source connected within \(formatDuration(receiving.timeoutMilliseconds))")
            }
            do throws(SwiftletError) {
                channel = try MigrationChannel.accept(accepted.rawValue, token: token, timeoutMilliseconds: 10_000)
                connection = accepted
                break
            } catch {
                log("refused a migration connection: \(error.description)")
            }
        }
        // One machine per receive: nobody else gets in.
        if let null = try? OwnedFileDescriptor.open("/dev/null", flags: O_RDONLY) { dup2(null.rawValue, receiving.listener) }
        if access(directory.migratedPath, F_OK) == 0 { SnapshotDirectory(directory.migratedPath).remove() }
        var arrived: (record: MachineRecord, network: MachineNetwork?)?
        // The filters this process installs before its guest runs, compiled while memory arrives.
        Confinement.prepare(.vmm)
        let migration = try Machine.receiveMigration(over: channel, into: directory.migratedPath) { snapshot throws(SwiftletError) in
            let path = snapshot.directory
            // The state is read once, for the record and the restore.
            let read = try Machine.readSnapshot(path)
            snapshot.mark("state read")
            var (record, disk) = try MachineSnapshotRecord.read(read, directory: path)
            // The machine's own disk is the arrived one (one file, two names until `migratedPath` goes).
            try FileTree.link(disk, as: directory.diskPath)
            record.name = directory.name
            record.diskBase = nil
            let network = try record.network.flatMap { policy throws(SwiftletError) in
                policy.hasNetwork ? try MachineNetwork(deferred: policy, logFile: directory.passtLogPath) : nil
            }
            arrived = (record, network)
            snapshot.mark("record")
            // The pages the guest kept writing during the copy are copied in as it starts.
            return try Machine.restoring(from: path, consoleOutput: console, vsockPorts: port, diffable: false,
                                         writableDisks: [DiskConfig(path: directory.diskPath)], prefetchWorkingSet: true,
                                         readOnlyDisks: SnapshotPaths.resolver(trusting: record), network: network?.device(log: log),
                                         lazyMemory: snapshot.lazyMemory, alreadyRead: read)
        }
        // The stream stays open for this process's life: the source's `go`, and a post-copy's
        // pages, come on it after the machine is built.
        _ = connection.release()
        let (record, network) = arrived!
        return (migration, record, network)
    }

    /// What a machine arriving by migration does once it is built, before its guest runs: takes
    /// it over from the source (`go`: from here it must run here, so nothing after fails the
    /// run), writes its record, and starts its network once the source let its ports go.
    private static func takeOver(_ migration: IncomingMigration, directory: MachineDirectory, record: MachineRecord,
                                 network: MachineNetwork?) throws(SwiftletError) {
        try migration.takeOver()
        do { try directory.writeRecord(record) } catch { log("the machine runs, but its record could not be written: \(error.description)") }
        migration.mark("recorded")
        // The source's passt lets its published ports go as its process ends.
        do { try network?.start(busyPortMilliseconds: 10_000) } catch {
            log("the machine runs without its network: \(error.description)")
        }
        migration.mark("taken over")
    }

    /// Serves the built machine `vm` until its run ends.
    private static func serve(_ directory: MachineDirectory, vm: Machine, record: MachineRecord, network: MachineNetwork?, port: InProcessPort,
                              signals: Int32, listener: Int32, newIdentity: Bool, incoming: IncomingMigration?,
                              ready: () -> Void) throws(SwiftletError) -> (status: Int32, text: String) {
        var built: (@Sendable () throws(SwiftletError) -> Void)?
        var guestStarts: (@Sendable () -> Void)?
        if let incoming {
            built = { () throws(SwiftletError) in try takeOver(incoming, directory: directory, record: record, network: network) }
            guestStarts = {
                incoming.mark("confined")
                incoming.confirmRunning()
                log("arrived by migration; its pause here: state arrived, \(incoming.timeline)")
            }
        }
        let machineThread = try MachineThread(vm, confined: true, built: built, guestStarts: guestStarts)
        defer { machineThread.stop() }

        func ending() -> (status: Int32, text: String) {
            switch machineThread.wait() {
            case .failure(let error): return (ExitStatus.setupFailed, "failed: " + error.description)
            case .success(let report) where report.exit == .migrated: return (0, movedAway)
            case .success(let report):
                return report.exit.isClean ? (0, "stopped: " + report.exit.description) : (ExitStatus.guestCrashed, "crashed: " + report.exit.description)
            }
        }
        // The agent's first session: after a restore, the only one its identity (hostname, random
        // seed) goes to, so it must be the agent's own.
        guard let agent = try AgentSession.open(on: port, for: vm, cancel: machineThread.ended, dropped: log) else {
            let (_, text) = ending()
            throw SwiftletError(.guestFailure, "the guest stopped before its agent was ready (\(text)); its console is in \(directory.consolePath)")
        }
        if newIdentity { try agent.announceNewIdentity(hostname: record.name) }
        if let network {
            if incoming == nil {
                try network.configureGuest(through: agent)
            } else {
                // A machine that moved here runs here now, whatever: without a network if it could not start.
                do { try network.configureGuest(through: agent) } catch { log("the machine runs without its network: \(error.description)") }
            }
        }
        let server = ControlServer(vm: vm, agent: agent, port: port, ended: machineThread.ended, record: record,
                                   releaseNetwork: { network?.stop() })
        ready()

        while true {
            let ready = try Poll.wait([listener, machineThread.ended, signals])
            if ready[1] { break }
            if ready[2] {
                while SignalFD.next(from: signals) != nil {}
                server.stop(timeoutMilliseconds: 10_000)
            }
            guard ready[0] else { continue }
            do throws(SwiftletError) {
                guard let client = try UnixSocket.accept(listener) else { continue }
                let channel = ControlChannel(client)
                if (try? OSThread.start(name: "control", { server.handle(channel) }))?.detach() == nil {
                    try? channel.send(ControlReply.failed("the machine's VMM process cannot start a thread"))
                }
            } catch {
                // No descriptor for the client (EMFILE, ENFILE) or no memory: it stays in the
                // backlog and the listener stays readable. Back off instead of spinning.
                _ = try? Poll.wait([machineThread.ended, signals], timeoutMilliseconds: 100)
            }
        }
        server.waitForStop()
        server.waitForReplies()
        return ending()
    }
}

/// Answers control requests for a running machine; one instance shared by every connection's thread.
final class ControlServer: Sendable {
    let vm: Machine
    let agent: AgentSession
    let port: InProcessPort
    let ended: Int32
    let record: MachineRecord
    let started = MonotonicClock.now
    private let paused = Atomic<Bool>(false)
    /// Set while a migration runs; and once the machine has moved.
    private let migrating = Atomic<Bool>(false)
    let migrated = Atomic<Bool>(false)
    /// Requests read and not yet answered.
    private let answering = Atomic<Int>(0)
    /// Set once a stop began; the thread that enforces its deadline.
    private let stopper = Mutex<OSThread?>(nil)

    /// Ends the machine's passt: once a migration committed, its published ports are the destination's.
    let releaseNetwork: @Sendable () -> Void

    init(vm: Machine, agent: AgentSession, port: InProcessPort, ended: Int32, record: MachineRecord,
         releaseNetwork: @escaping @Sendable () -> Void = {}) {
        self.vm = vm; self.agent = agent; self.port = port; self.ended = ended; self.record = record
        self.releaseNetwork = releaseNetwork
    }

    func handle(_ channel: ControlChannel) {
        guard let (request, fds) = try? channel.receive(ControlRequest.self) else { return }
        defer { _ = OwnedFileDescriptors(taking: fds) } // closed here, once the request is answered
        answering.add(1, ordering: .acquiringAndReleasing)
        defer { answering.subtract(1, ordering: .acquiringAndReleasing) }
        let reply: ControlReply
        switch request.operation {
        case .status:
            reply = ControlReply(state: paused.load(ordering: .acquiring) ? "paused" : "running", pid: getpid(), cpus: record.cpus,
                                 memoryMiB: record.memoryMiB, uptimeMilliseconds: Int((MonotonicClock.now - started) / 1_000_000),
                                 residentKiB: ProcessMemory.residentKiB(), memory: try? vm.memoryStatus())
        case .pause, .resume:
            let pause = request.operation == .pause
            do {
                if pause { try vm.pauseBlocking() } else { try vm.resumeBlocking() }
                paused.store(pause, ordering: .releasing)
                reply = ControlReply()
            } catch {
                reply = .failed(error.description)
            }
        case .stop:
            stop(timeoutMilliseconds: request.timeoutMilliseconds ?? 10_000)
            reply = ControlReply()
        case .exec:
            reply = exec(request, fds: fds, channel: channel)
        case .snapshot:
            reply = snapshot(request)
        case .migrate:
            reply = migrate(request, fds: fds, channel: channel)
        case .memory:
            do throws(SwiftletError) {
                guard let mib = request.memoryTargetMiB, mib > 0 else { throw SwiftletError(.invalidArgument, "malformed memory request") }
                try vm.setMemoryTarget(bytes: UInt64(mib) << 20)
                reply = ControlReply(memory: try vm.memoryStatus())
            } catch {
                reply = .failed(error.description)
            }
        }
        try? channel.send(reply)
    }

    /// Moves the machine to the destination on the passed stream (`Machine.migrate`), telling
    /// the client each round as it starts. On success the machine's run ends (`.migrated`) and
    /// this process with it, once the reply is out (`waitForReplies`).
    private func migrate(_ request: ControlRequest, fds: [Int32], channel: ControlChannel) -> ControlReply {
        guard fds.count == 1, let text = request.token else { return .failed("malformed migrate request (\(fds.count) descriptors)") }
        do {
            let token = try MigrationChannel.token(fromText: text)
            let annotations = [MachineSnapshotRecord.recordAnnotation: try MachineSnapshotRecord.encode(record),
                               AgentSnapshot.annotation: try AgentSnapshot.encode(record.defaults)]
            var options = MigrationOptions()
            if let value = request.maximumDowntimeMilliseconds { options.maximumDowntimeMilliseconds = value }
            if let value = request.maximumRounds { options.maximumRounds = value }
            if let value = request.timeLimitMilliseconds { options.timeLimitMilliseconds = value }
            options.bandwidthBytesPerSecond = request.bandwidthBytesPerSecond
            options.postcopy = request.postcopy ?? false
            if paused.load(ordering: .acquiring) {
                return .failed("machine \(record.name) is paused: resume it before moving it (`swiftlet machine resume \(record.name)`)")
            }
            migrating.store(true, ordering: .releasing)
            defer { migrating.store(false, ordering: .releasing) }
            let report = try vm.migrate(over: fds[0], token: token, annotations: annotations, options: options, progress: { progress in
                var line = ControlReply()
                line.progress = progress
                try? channel.send(line)
            }, committed: releaseNetwork)
            migrated.store(true, ordering: .releasing)
            var reply = ControlReply()
            reply.migration = report
            return reply
        } catch {
            return .failed(error.description)
        }
    }

    /// Waits (at most 5 s) until the replies to requests being answered went out (a migration's
    /// report, an exec that the move cut short): the process must not end first.
    func waitForReplies() {
        let deadline = MonotonicClock.now + 5_000_000_000
        while answering.load(ordering: .acquiring) > 0 && MonotonicClock.now < deadline { usleep(5_000) }
    }

    /// Writes a snapshot of the machine (its disk included) with what a restore or a fork needs
    /// to make a machine of it: the record, and the image's command defaults for `run --from`.
    private func snapshot(_ request: ControlRequest) -> ControlReply {
        guard let path = request.path, path.hasPrefix("/") else { return .failed("malformed snapshot request") }
        do {
            let annotations = [MachineSnapshotRecord.recordAnnotation: try MachineSnapshotRecord.encode(record),
                               AgentSnapshot.annotation: try AgentSnapshot.encode(record.defaults)]
            let report = try vm.snapshotBlocking(to: path, kind: request.diff == true ? .diff : .full, annotations: annotations)
            var reply = ControlReply()
            reply.snapshotID = report.id
            reply.memoryPagesWritten = report.memoryPagesWritten
            reply.bytesWritten = report.bytesWritten
            reply.pausedMilliseconds = Double(report.pausedNanoseconds) / 1e6
            return reply
        } catch {
            return .failed(error.description)
        }
    }

    /// Asks the guest to shut down (the agent powers off when its first connection closes), and
    /// stops the machine by force if it has not after `timeoutMilliseconds`.
    func stop(timeoutMilliseconds: Int) {
        stopper.withLock { thread in
            guard thread == nil else { return }
            if paused.load(ordering: .acquiring) {
                try? vm.resumeBlocking()
                paused.store(false, ordering: .releasing)
            }
            agent.shutdown()
            let vm = self.vm, ended = self.ended
            thread = try? OSThread.start(name: "stop") {
                if (try? Poll.waitReadable(ended, timeoutMilliseconds: max(0, timeoutMilliseconds))) == true { return }
                log("the guest did not shut down within \(timeoutMilliseconds) ms: stopping it")
                vm.stop()
            }
            if thread == nil { vm.stop() }
        }
    }

    /// Waits for a stop's deadline thread, if a stop began.
    func waitForStop() {
        stopper.withLock { $0 }?.join()
    }

    private func exec(_ request: ControlRequest, fds: [Int32], channel: ControlChannel) -> ControlReply {
        let hasInput = request.input == true
        guard let arguments = request.arguments, !arguments.isEmpty, fds.count == (hasInput ? 3 : 2) else {
            return .failed("malformed exec request (\(fds.count) descriptors)")
        }
        guard !paused.load(ordering: .acquiring) else {
            return .failed("machine \(record.name) is paused: resume it with `swiftlet machine resume \(record.name)`")
        }
        let session: AgentSession
        do {
            try agent.send(.openSession)
            guard let opened = try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 30_000, cancel: ended, dropped: log) else {
                return .failed("the guest agent did not open a session for the command")
            }
            session = opened
        } catch {
            return .failed(error.description)
        }
        let execRequest = ExecRequest(arguments: arguments, environment: request.environment ?? [],
                                      workingDirectory: request.workingDirectory ?? "/", user: request.user ?? "",
                                      terminal: request.terminal ?? false, rows: request.rows ?? 24, columns: request.columns ?? 80)
        // The client's signals and window size, relayed while the command runs; the client going
        // away ends the session (and with it the command).
        guard let stopRelay = try? EventFD(nonBlocking: true) else { return .failed("cannot create an eventfd") }
        let cancel = stopRelay.rawValue
        let relay = try? OSThread.start(name: "exec-relay") {
            while true {
                if !channel.hasBufferedMessage {
                    guard let ready = try? Poll.wait([channel.fd, cancel]), !ready[1] else { return }
                }
                guard let (control, passed) = try? channel.receive(ExecControl.self) else {
                    session.shutdown()
                    return
                }
                _ = OwnedFileDescriptors(taking: passed) // a control message passes none: close any
                if let signal = control.signal { try? session.send(.signal(signal)) }
                if let rows = control.rows, let columns = control.columns { try? session.resize(rows: rows, columns: columns) }
            }
        }
        let outcome = Result { () throws(SwiftletError) in
            try session.run(execRequest, streams: .init(input: hasInput ? fds[0] : nil, output: fds[hasInput ? 1 : 0],
                                                        error: fds[hasInput ? 2 : 1]))
        }
        stopRelay.signal()
        relay?.join()
        switch outcome {
        case .success(let result): return ControlReply(status: result.status, failure: result.failure)
        case .failure(let error):
            if migrated.load(ordering: .acquiring) || migrating.load(ordering: .acquiring) {
                return .failed("machine \(record.name) moved to another host while the command ran: its session ended with the move (connections into the guest do not move); run it again with `swiftlet machine exec` there")
            }
            return .failed(error.description)
        }
    }
}

/// A line in the VMM process's log (its standard error, `vmm.log` in the machine's directory).
func log(_ message: String) {
    var line = "swiftlet: " + message + "\n"
    line.withUTF8 { try? OwnedFileDescriptor.writeAll(fd: 2, UnsafeRawBufferPointer($0)) }
}
