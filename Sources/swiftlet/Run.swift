import AgentProtocol
import ArgumentParser
import Glibc
import Pack
import Synchronization
import SwiftletSystem
import SwiftletKit
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
            machine continues where its agent was ready, with the snapshot's image and hardware. \
            --image FILE does the same with a pack of one (`swiftlet pack create`), which need \
            not come from this host.

              swiftlet snapshot --image alpine:3.20 -o alpine.snap
              swiftlet run --from alpine.snap -- cat /etc/os-release

            The machine has no network unless asked: --net gives it outbound access through \
            user-mode NAT (the host is host.swiftlet.internal), --allow-host and --allow-cidr \
            only to those names and ranges (other names do not resolve), -p publishes a guest \
            port on the host's loopback (docs/networking.md).

              swiftlet run --net -- wget -qO- http://example.com
              swiftlet run --allow-host pypi.org --allow-host '*.pythonhosted.org' --image python:3.12 -- pip install requests
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

    @OptionGroup(title: "Network") var network: NetworkOptions

    @OptionGroup(title: "Host directories") var volumes: VolumeOptions

    /// Parses 30s, 500ms, 2m, 1h or a plain number of seconds into milliseconds: nil when it is
    /// not a positive duration of at most a year ("inf", "1e300s" and "-1s" among them).
    static func milliseconds(_ text: String) -> Int? {
        let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        let (number, scale) = units.first { text.hasSuffix($0.0) }.map { (text.dropLast($0.0.count), $0.1) } ?? (Substring(text), 1000)
        guard let value = Double(number), value > 0, value * scale <= 365 * 86_400_000 else { return nil }
        return max(1, Int(value * scale))
    }

    func validate() throws {
        if let timeout, Self.milliseconds(timeout) == nil {
            throw ValidationError("--timeout \(timeout): expected a duration such as 30s, 500ms or 2m")
        }
        if from != nil && (source.image != nil || source.rootfs != nil || machine.shapesTheMachine || cold) {
            throw ValidationError("--from starts the machine a snapshot holds: it cannot be combined with --image, --rootfs, --kernel, --cpus, --memory, --cpu-template or --cold")
        }
        if let image = source.image, MachinePack.looksLikePack(image) {
            // A snapshot's pack holds its machine; an image's boots a machine of run's shape, with its own kernel.
            let isImage = (try? MachinePack.inspect(image))?.manifest.kind == .image
            if isImage ? machine.kernel != nil : (machine.shapesTheMachine || cold) {
                throw ValidationError(isImage ? "--image \(image) is a pack of an image, which boots the kernel it holds: --kernel cannot be combined with it"
                                              : "--image \(image) is a pack, which holds its machine: it cannot be combined with --kernel, --cpus, --memory, --cpu-template or --cold")
            }
        }
        if from != nil && !volumes.volumes.isEmpty {
            throw ValidationError("--from starts the machine a snapshot holds, with the devices it had: --volume needs a machine that boots")
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
        let forwarded = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]
        for signal in forwarded { Glibc.signal(signal, SIG_DFL) }
        // A reader that goes away (`swiftlet run ... | head -1`) must not kill the VMM mid-run.
        Glibc.signal(SIGPIPE, SIG_IGN)
        let signals = try? SignalFD(blocking: forwarded)
        defer { withExtendedLifetime(signals) {} }
        var run = CommandRun(root: root)
        run.command = exec.command
        run.environment = exec.environment
        run.workingDirectory = exec.workdir
        run.user = exec.user
        run.kernel = machine.kernel
        run.cpus = machine.cpus
        run.memoryMiB = machine.memory
        run.allowPVM = machine.allowPVM
        run.cpuTemplate = machine.cpuTemplate
        run.timeoutMilliseconds = timeout.flatMap(Self.milliseconds)
        run.cold = cold
        run.showConsole = console
        run.terminal = exec.tty
        run.confined = true
        run.network = try network.configuration()
        run.volumes = try volumes.mounts()
        run.unpacksOutsideHome = PackedProgram.path != nil
        let terminal = TerminalSession(enabled: exec.tty && isatty(0) == 1)
        defer { terminal.restore() }
        let io = CommandRun.IO(input: exec.interactive || exec.tty ? 0 : nil, signals: signals?.rawValue,
                               windowSize: terminal.enabled ? { @Sendable in RawTerminal.size(of: 0) } : nil,
                               beforeCommand: { terminal.makeRaw() }, log: { printError($0) })
        let outcome = try exitingOnFailure(timeout: timeout) { () throws(CommandRun.Failure) in
            defer { terminal.restore() }
            return try run.run(io: io)
        }
        if let failure = outcome.failure { printError(failure) }
        if timing {
            let line = outcome.marks.map { "\($0.name)=\(format(MonotonicClock.milliseconds(from: MonotonicClock.processStart, to: $0.time), digits: 2))" }
            printError("timing " + line.joined(separator: " "))
        }
        throw ExitCode(outcome.status)
    }

    /// The machine's root, from --from, --image (a pack among them), --rootfs or neither.
    var root: CommandRun.Root {
        if let from { return .snapshot(from) }
        if let image = source.image, MachinePack.looksLikePack(image) { return .pack(image) }
        // A detached run's image was resolved by the process that started it.
        if let image = getenv(Self.resolvedImageVariable).map({ String(cString: $0) }) ?? source.image {
            return .image(image, policy: source.pull, insecureRegistry: source.insecureRegistry)
        }
        return source.rootfs.map { .rootfs($0) } ?? .defaultImage
    }
}

/// The host terminal of a `-t` command: raw while the command runs, restored after (and before
/// any message is printed).
final class TerminalSession: Sendable {
    let enabled: Bool
    private let saved = Mutex<RawTerminal?>(nil)

    init(enabled: Bool) { self.enabled = enabled }

    func makeRaw() {
        guard enabled else { return }
        saved.withLock { if $0 == nil { $0 = RawTerminal(fd: 0) } }
    }

    func restore() {
        saved.withLock { $0?.restore(); $0 = nil }
    }
}
