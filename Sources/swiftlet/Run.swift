import AgentProtocol
import ArgumentParser
import CLinux
import Glibc
import Synchronization
import SwiftletSystem
import VMM

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a command in a fresh microVM and return its output and exit status.",
        discussion: """
            Boots a VM whose root filesystem is the image (--image; the default busybox image \
            without it), runs the command there through the guest agent with the image's \
            entrypoint, environment, working directory and user, relays its standard input (with \
            -i), output and error separately, and exits with its status (128+N if signal N ended \
            it; 127 if the command does not exist). The VM is destroyed when the command ends.

            --image takes a registry reference (pulled once into the image store, then used from \
            there), an OCI image layout directory, a `docker save` or OCI archive, or - for an \
            archive on standard input; DIR:TAG or ARCHIVE:TAG picks one of several images.

              swiftlet run -- sh -c 'echo out; echo err >&2; exit 7'
              swiftlet run --image alpine:3.20 -- cat /etc/os-release
              skopeo copy docker://debian:12 oci:debian:12 && swiftlet run --image debian:12 -- ls

            --from DIR starts from a snapshot made by `swiftlet snapshot` instead of booting: the \
            machine continues where its agent was ready, with the snapshot's image and hardware.

              swiftlet snapshot --image alpine:3.20 -o alpine.snap
              swiftlet run --from alpine.snap -- cat /etc/os-release
            """)

    @OptionGroup var exec: CommandOptions

    @Flag(name: .shortAndLong, help: "Run in the background: print an ID; output and exit status go to $SWIFTLET_HOME/runs/ID.")
    var detach = false

    @Option(help: ArgumentHelp("Stop the VM after this long (e.g. 30s, 500ms, 2m); exit status 124.", valueName: "duration"))
    var timeout: String?

    @OptionGroup var source: RootOptions

    @Flag(help: "Show the guest kernel's console on standard error.")
    var console = false

    @Option(help: ArgumentHelp("Start from this snapshot (`swiftlet snapshot`) instead of booting: the image, vCPUs and memory are the snapshot's.", valueName: "dir"))
    var from: String?

    @Flag(help: ArgumentHelp("Print when each phase ended (ms from process start) on stderr.", visibility: .hidden))
    var timing = false

    @Flag(help: "Boot the kernel even when a saved boot of this machine shape (a boot template) could be restored instead.")
    var cold = false

    @OptionGroup var machine: MachineOptions

    static let agentPort: UInt32 = 1024

    /// Parses 30s, 500ms, 2m, 1h or a plain number of seconds into milliseconds.
    static func milliseconds(_ text: String) -> Int? {
        let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let value = Double(text.dropLast(suffix.count)), value > 0 else { return nil }
            return Int(value * scale)
        }
        return Double(text).flatMap { $0 > 0 ? Int($0 * 1000) : nil }
    }

    func validate() throws {
        if let timeout, Self.milliseconds(timeout) == nil {
            throw ValidationError("--timeout \(timeout): expected a duration such as 30s, 500ms or 2m")
        }
        if from != nil && (source.image != nil || source.rootfs != nil || machine.shapesTheMachine || cold) {
            throw ValidationError("--from starts the machine a snapshot holds: it cannot be combined with --image, --rootfs, --kernel, --cpus, --memory or --cold")
        }
        if detach && (exec.interactive || exec.tty) { throw ValidationError("-d cannot be combined with -i or -t: a background run has no terminal or input") }
    }

    func run() throws {
        if detach && !Self.isDetachedChild {
            try exitingOnSetupFailure { () throws(SwiftletError) in try startInBackground() }
            return
        }
        do { try runHere() } catch let exit as ExitCode {
            Self.recordStatus(exit.rawValue)
            throw exit
        }
        Self.recordStatus(0)
    }

    /// Runs the VM in this process.
    func runHere() throws {
        // Signals to forward are blocked here, before any thread starts, and read from a signalfd.
        // A shell starts background jobs with SIGINT and SIGQUIT ignored, which would discard
        // them before the signalfd sees them: `kill -INT` must still reach the command.
        var forwarded = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]
        for signal in forwarded { Glibc.signal(signal, SIG_DFL) }
        // A reader that goes away (`swiftlet run ... | head -1`) must not kill the VMM mid-run.
        Glibc.signal(SIGPIPE, SIG_IGN)
        let signals = swiftlet_signalfd(&forwarded, Int32(forwarded.count))
        do {
            try runOnce(signals: signals, templates: cold || from != nil ? .none : .restoreOrSave)
        } catch let failure as TemplateRestoreFailure {
            // Nothing of the command ran: boot instead, and save a template that works.
            failure.template.remove()
            try runOnce(signals: signals, templates: .save)
        }
    }

    /// What a run does with boot templates.
    enum TemplateUse {
        /// Restore the template when there is one; otherwise boot and save one.
        case restoreOrSave
        /// Boot and save a template.
        case save
        /// Boot with the root given on the kernel command line.
        case none
    }

    /// A restored boot template stopped before its agent was ready: it must not be used again.
    struct TemplateRestoreFailure: Error {
        let template: BootTemplate
    }

    func runOnce(signals: Int32, templates: TemplateUse) throws {
        // Process start, the runtime and the arguments: what is left is the library's work.
        var marks: [(String, UInt64)] = [("process", MonotonicClock.now)]
        let consoleLog = console ? nil : ConsoleLog()
        let port = try InProcessPort(port: Self.agentPort)
        let (vm, defaultRequest, pendingRoot) = try exitingOnSetupFailure { () throws(SwiftletError) in
            try makeMachine(signals: signals, consoleOutput: console ? 2 : consoleLog?.fd, port: port, templates: templates)
        }
        var request = defaultRequest
        marks.append((from == nil && pendingRoot?.restored != true ? "image" : "snapshot", MonotonicClock.now))

        let machineThread = try MachineThread(vm)
        let watchdog = try Watchdog(milliseconds: timeout.flatMap(Self.milliseconds)) { vm.stop() }
        var terminal: RawTerminal?
        defer {
            terminal?.restore()
            watchdog.cancel()
            machineThread.stop()
        }

        func machineFailure() -> Int32 {
            switch machineThread.wait() {
            case .failure(let error)?:
                printError(error.description)
                return Status.setupFailed
            case .success(let report)?:
                if watchdog.fired { return timedOut() }
                consoleLog?.printTail()
                printError(report.exit.isClean ? "the guest stopped before its agent answered (\(report.exit))" : report.exit.description)
                return Status.guestCrashed
            case nil:
                return Status.setupFailed
            }
        }
        func timedOut() -> Int32 {
            printError("the command did not finish within \(timeout ?? ""); the VM was stopped")
            return 124
        }

        /// A restored template that ends before its agent is ready is not the user's failure.
        func templateFailed() -> Bool {
            guard let pendingRoot, pendingRoot.restored, !watchdog.fired else { return false }
            machineThread.stop()
            return true
        }
        guard let connection = port.next(timeoutMilliseconds: -1, cancel: machineThread.ended) else {
            if templateFailed(), let pendingRoot { throw TemplateRestoreFailure(template: pendingRoot.template) }
            throw ExitCode(machineFailure())
        }
        marks.append(("connected", MonotonicClock.now))
        let session = AgentSession(socket: connection)
        let ready: Bool
        do { ready = try session.waitUntilReady() } catch {
            if templateFailed(), let pendingRoot { throw TemplateRestoreFailure(template: pendingRoot.template) }
            printError(error.description)
            throw ExitCode(Status.guestCrashed)
        }
        guard ready else {
            if templateFailed(), let pendingRoot { throw TemplateRestoreFailure(template: pendingRoot.template) }
            throw ExitCode(machineFailure())
        }
        // Every run from one snapshot starts from the same kernel random state: reseed it.
        if from != nil || pendingRoot?.restored == true {
            do { try session.announceNewIdentity(hostname: nil) } catch {
                printError(error.description)
                throw ExitCode(Status.guestCrashed)
            }
        }
        marks.append(("ready", MonotonicClock.now))
        if let pendingRoot {
            if !pendingRoot.restored {
                // Saving is an optimisation for later runs: this one goes on without it.
                do { try pendingRoot.template.save(vm) } catch { printError("warning: cannot save the boot template (later runs boot too): \(error)") }
                marks.append(("template", MonotonicClock.now))
            }
            do {
                for (index, disk) in pendingRoot.disks.enumerated() { try vm.insertDisk(at: index, DiskConfig(path: disk, readOnly: true)) }
                try session.mountRoot(devices: pendingRoot.disks.indices.map(RootFilesystem.deviceName))
            } catch {
                consoleLog?.printTail()
                printError(error.description)
                throw ExitCode(Status.guestCrashed)
            }
            marks.append(("root", MonotonicClock.now))
        }

        var rows: UInt16 = 24, columns: UInt16 = 80
        if exec.tty && isatty(0) == 1 {
            terminal = RawTerminal(fd: 0)
            (rows, columns) = RawTerminal.size(of: 0) ?? (rows, columns)
        }
        request.terminal = exec.tty
        request.rows = rows
        request.columns = columns
        let outcome: AgentSession.Outcome
        do {
            let windowSize: (@Sendable () -> (rows: UInt16, columns: UInt16)?)?
            if terminal != nil {
                windowSize = { @Sendable in RawTerminal.size(of: 0).map { (rows: $0.0, columns: $0.1) } }
            } else {
                windowSize = nil
            }
            outcome = try session.run(request, streams: .init(input: exec.interactive || exec.tty ? 0 : nil, output: 1, error: 2,
                                                              signals: signals >= 0 ? signals : nil, windowSize: windowSize))
        } catch {
            if watchdog.fired { throw ExitCode(timedOut()) }
            terminal?.restore()
            printError(error.description)
            throw ExitCode(machineFailure())
        }
        marks.append(("command", MonotonicClock.now))
        if let failure = outcome.failure { printError(failure) }
        // The first run from a snapshot records what it wrote; later runs copy that in as they start.
        // Only a hint: a snapshot directory this user cannot write to goes without.
        if from != nil || pendingRoot?.restored == true { _ = try? vm.saveWorkingSet() }
        if timing {
            if case .success(let report)? = machineThread.stop() { marks.insert(("vm", report.firstRun), at: 2) }
            marks.append(("teardown", MonotonicClock.now))
            let line = marks.map { "\($0.0)=\(format(MonotonicClock.milliseconds(from: MonotonicClock.processStart, to: $0.1), digits: 2))" }
            printError("timing " + line.joined(separator: " "))
        }
        throw ExitCode(outcome.status)
    }
}

/// The guest console when nobody watches it: kept in an unlinked temporary file so a failed
/// boot can show how it ended.
final class ConsoleLog {
    private let file: OwnedFileDescriptor
    var fd: Int32 { file.rawValue }

    init?() {
        guard let file = try? OwnedFileDescriptor.unlinkedTemporaryFile(in: "/tmp", prefix: "swiftlet-console") else { return nil }
        self.file = file
    }

    /// Prints the last lines of the console to stderr.
    func printTail(lines: Int = 30) {
        let size = lseek(fd, 0, SEEK_END)
        let start = max(0, size - 16384)
        var bytes = [UInt8](repeating: 0, count: Int(size - start))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, start) }
        guard n > 0 else { return }
        let text = String(decoding: bytes[0..<n], as: UTF8.self)
        let tail = text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
        var out = "--- guest console (last lines) ---\n" + tail + "\n---\n"
        out.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }
}

/// A machine running on a thread of its own, whose end can be waited for with poll(2).
final class MachineThread {
    let vm: Machine
    private let thread: OSThread
    private let endedFD: EventFD
    private let result = ResultSlot()
    private var joined = false
    private final class ResultSlot: Sendable { let value = Mutex<Result<MachineRunReport, SwiftletError>?>(nil) }

    /// Readable once the machine has stopped.
    var ended: Int32 { endedFD.rawValue }

    init(_ vm: Machine) throws(SwiftletError) {
        self.vm = vm
        endedFD = try EventFD(nonBlocking: true)
        let fd = endedFD.rawValue, slot = result
        thread = try OSThread.start(name: "machine", stackSize: 1 << 20) {
            let r = Result { () throws(SwiftletError) in try vm.runBlocking() }
            slot.value.withLock { $0 = r }
            var one: UInt64 = 1
            _ = write(fd, &one, 8)
        }
    }

    /// Stops the machine (if it still runs), waits for it, and returns how its run ended.
    @discardableResult
    func stop() -> Result<MachineRunReport, SwiftletError>? {
        vm.stop()
        return wait()
    }

    /// Waits for the machine to stop by itself, and returns how its run ended.
    func wait() -> Result<MachineRunReport, SwiftletError>? {
        if !joined {
            thread.join()
            joined = true
        }
        return result.value.withLock { $0 }
    }
}

/// Stops the VM when the time is up, unless cancelled first.
final class Watchdog: Sendable {
    private let cancelled: EventFD
    private final class Flag: Sendable { let value = Atomic<Bool>(false) }
    private let state = Flag()
    private let thread: OSThread?

    init(milliseconds: Int?, onTimeout: @escaping @Sendable () -> Void) throws(SwiftletError) {
        cancelled = try EventFD(nonBlocking: true)
        guard let milliseconds else { thread = nil; return }
        let fd = cancelled.rawValue, state = state
        thread = try OSThread.start(name: "timeout") {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            var remaining = milliseconds
            let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
            while remaining > 0 {
                let n = poll(&p, 1, Int32(min(remaining, Int(Int32.max))))
                if n > 0 { return }
                let now = MonotonicClock.now
                remaining = now >= deadline ? 0 : Int((deadline - now) / 1_000_000)
            }
            state.value.store(true, ordering: .releasing)
            onTimeout()
        }
    }

    var fired: Bool { state.value.load(ordering: .acquiring) }

    func cancel() {
        cancelled.signal()
        thread?.join()
    }
}

/// The host terminal in raw mode while a `-t` command runs.
struct RawTerminal {
    let fd: Int32
    let saved: termios

    init?(fd: Int32) {
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return nil }
        saved = t
        self.fd = fd
        cfmakeraw(&t)
        tcsetattr(fd, TCSANOW, &t)
    }

    func restore() {
        var t = saved
        tcsetattr(fd, TCSANOW, &t)
    }

    static func size(of fd: Int32) -> (UInt16, UInt16)? {
        var size = winsize()
        guard swiftlet_ioctl_ptr(fd, SWIFTLET_TIOCGWINSZ, &size) == 0 else { return nil }
        return (size.ws_row, size.ws_col)
    }
}
