import AgentProtocol
import Hypervisor
import Glibc
import Images
import MachineState
import SwiftletNet
import SwiftletSystem
import VMM

/// `swiftlet run` as a use case: a command in a fresh, throwaway machine, from an image (booted,
/// or restored from its boot template) or from a snapshot, with its output, error and exit status.
///
/// ```swift
/// var run = CommandRun(root: .image("alpine:3.20", policy: .missing, insecureRegistry: false))
/// run.command = ["cat", "/etc/os-release"]
/// let outcome = try run.run(io: CommandRun.IO())
/// print(outcome.status)
/// ```
public struct CommandRun: Sendable {
    /// What the machine's root is.
    public enum Root: Sendable, Equatable {
        /// The default busybox image (`make build`).
        case defaultImage
        /// A root filesystem image (EROFS or ext4).
        case rootfs(String)
        /// An image: a registry reference, an OCI layout directory, an archive, or a digest in the store.
        case image(String, policy: PullPolicy, insecureRegistry: Bool)
        /// A snapshot made by `ImageSnapshot` (`swiftlet snapshot`): its image and hardware.
        case snapshot(String)
        /// A pack (`MachinePack`) of a snapshot, restored (its memory read lazily where it can
        /// be), or of an image, booted with the pack's kernel and agent (through a boot template
        /// keyed by their digests): unpacked into a private directory for the run, which leaves
        /// the file untouched.
        case pack(String)
    }

    public var root: Root
    /// The command and its arguments (empty: the image's default command).
    public var command: [String] = []
    /// KEY=VALUE over the image's environment.
    public var environment: [String] = []
    public var workingDirectory: String?
    public var user: String?
    public var kernel: String?
    public var cpus = 1
    public var memoryMiB = 256
    public var allowPVM = false
    /// The machine is stopped after this long (`Failure.Reason.timedOut`).
    public var timeoutMilliseconds: Int?
    /// Boot the kernel even when a boot template of this machine shape could be restored.
    public var cold = false
    /// The guest console goes to standard error (else to a log shown when the guest fails).
    public var showConsole = false
    /// Give the command a terminal.
    public var terminal = false
    /// This process exists to run this command (the `swiftlet` CLI's `run`): it confines itself
    /// once the machine is built, before the guest runs (`Confinement.confine(.vmm)`), for the
    /// rest of its life. Leave it off in a program that goes on to do other work.
    public var confined = false
    /// What the machine's network may reach; the default (nothing asked for) gives it no network
    /// device. A run from a snapshot whose machine had one uses the snapshot's policy unless this
    /// asks for a network.
    public var network = NetworkConfiguration()
    /// The CPU baseline a booted machine's guest is shown (nil: the host's CPU, or an image
    /// pack's template). A snapshot keeps the CPU it was taken with: a restore refuses one.
    public var cpuTemplate: CPUTemplate?
    /// Host directories the guest sees (`--volume`). A run with volumes boots (no boot template:
    /// a template's machine has no file system device), and a snapshot's machine cannot take any.
    public var volumes: [VolumeMount] = []

    public init(root: Root) {
        self.root = root
    }

    /// A `.pack` root is unpacked into a temporary directory (`$TMPDIR`, else /var/tmp or /tmp)
    /// instead of `$SWIFTLET_HOME/unpacked`: for a packed program, which has no home of its own.
    public var unpacksOutsideHome = false

    /// An image pack's root, kernel and agent initramfs, once unpacked (a `.pack` root).
    var packedImage: MachinePack.PackedImageRoot?

    /// The read-only disks a `.snapshot` root may name (a pack's own copies); nil: image layers
    /// in this user's store and the default image (`SnapshotPaths.resolver`).
    var snapshotDisks: SnapshotDiskResolver?
    /// A `.snapshot` root's memory read lazily from a pack (nil: its memory file).
    var snapshotMemory: (any MemoryImageSource)?

    /// Where the command's streams go, and what the caller hears while it runs.
    public struct IO: Sendable {
        public var input: Int32?
        public var output: Int32
        public var error: Int32
        /// A signalfd whose signals are forwarded to the command (SIGWINCH: a resize to `windowSize()`).
        public var signals: Int32?
        public var windowSize: (@Sendable () -> (rows: UInt16, columns: UInt16)?)?
        /// Called once the command is about to start (a terminal goes raw then).
        public var beforeCommand: @Sendable () -> Void
        /// Progress lines (an image pull) and warnings.
        public var log: @Sendable (String) -> Void

        public init(input: Int32? = nil, output: Int32 = 1, error: Int32 = 2, signals: Int32? = nil,
                    windowSize: (@Sendable () -> (rows: UInt16, columns: UInt16)?)? = nil,
                    beforeCommand: @escaping @Sendable () -> Void = {}, log: @escaping @Sendable (String) -> Void = { _ in }) {
            self.input = input; self.output = output; self.error = error; self.signals = signals
            self.windowSize = windowSize; self.beforeCommand = beforeCommand; self.log = log
        }
    }

    /// How the command ended, and when each phase of the run ended (CLOCK_MONOTONIC ns, from
    /// `process` on: the image resolved or snapshot read, the guest's first KVM_RUN as `vm`, the
    /// agent connected and ready, the root mounted, the command, the teardown).
    public struct Outcome: Sendable {
        public var status: Int32
        /// The agent's word when the command could not start (status 126 or 127).
        public var failure: String?
        public var marks: [(name: String, time: UInt64)]
    }

    /// Why the command has no exit status of its own.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public enum Reason: Sendable, Equatable {
            /// The machine could not be made (bad input, missing kernel, no KVM).
            case setup
            /// The guest crashed or stopped before the command ended.
            case guest
            /// `timeoutMilliseconds` passed; the machine was stopped.
            case timedOut
            /// A signal from `IO.signals` (Ctrl-C) stopped the setup (a pull, for example).
            case interrupted(signal: Int32)
        }
        public var reason: Reason
        /// What went wrong first, when the failure has two parts (the agent's connection broke,
        /// and then the machine ended as `message` says).
        public var cause: String?
        public var message: String
        /// The end of the guest console, when it shows why the guest failed.
        public var consoleTail: String?

        public var description: String { cause.map { $0 + "; " + message } ?? message }

        public init(reason: Reason, cause: String? = nil, message: String, consoleTail: String? = nil) {
            self.reason = reason; self.cause = cause; self.message = message; self.consoleTail = consoleTail
        }

        /// The machine could not be made: `error` says why (an interrupted pull is `.interrupted`).
        static func setup(_ error: any Error) -> Failure {
            if let error = error as? SwiftletError, error.code == .interrupted, let signal = error.signal {
                return Failure(reason: .interrupted(signal: signal), message: error.description)
            }
            return Failure(reason: .setup, message: "\(error)")
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

    /// Runs the command and waits for it.
    public func run(io: IO) throws(Failure) -> Outcome {
        if confined {
            // Before the machine's threads start: none of them keeps a root's capabilities.
            do { try Confinement.dropCapabilities() } catch { throw Failure.setup(error) }
        }
        if case .pack(let path) = root, packedImage == nil {
            let unpacked: MachinePack.Unpacked
            var run = self
            do throws(SwiftletError) {
                unpacked = try MachinePack.unpack(path, outsideHome: unpacksOutsideHome, lazyMemory: true)
                if unpacked.kind == .image {
                    // Booted with the pack's kernel and agent, through a boot template keyed by their
                    // digests; a packed program (no home of its own) boots cold.
                    run.packedImage = try unpacked.image(what: path)
                    run.cold = cold || unpacksOutsideHome
                } else {
                    // A pack is untrusted: its maker's network policy is not taken.
                    if !network.hasNetwork, try Machine.network(ofSnapshot: unpacked.snapshotDirectory) != nil {
                        throw SwiftletError(.invalidArgument, "the machine in \(path) has a network device: give it a network policy of your own (--net, --allow-host, --allow-cidr, -p); a pack's is not taken")
                    }
                    run.root = .snapshot(unpacked.snapshotDirectory)
                    run.snapshotDisks = unpacked.readOnlyDisks
                    run.snapshotMemory = unpacked.lazyMemory
                }
            } catch {
                throw Failure.setup(error)
            }
            defer { withExtendedLifetime(unpacked) {} }
            return try run.run(io: io)
        }
        let isSnapshot = if case .snapshot = root { true } else { false }
        do {
            return try runOnce(io: io, templates: cold || isSnapshot || !volumes.isEmpty ? .none : .restoreOrSave)
        } catch let failure as TemplateRestoreFailure {
            // Nothing of the command ran: boot instead, and save a template that works.
            failure.template.remove()
        } catch let failure as Failure {
            throw failure
        } catch {
            throw Failure.setup(error)
        }
        // The image was resolved (and pulled) for the first attempt: the second does not pull
        // again (a confined process cannot start swiftlet-pull once its guest has run).
        var retry = self
        if case .image(let reference, .always, let insecure) = root { retry.root = .image(reference, policy: .missing, insecureRegistry: insecure) }
        do { return try retry.runOnce(io: io, templates: .save) } catch let failure as Failure { throw failure } catch {
            throw Failure.setup(error)
        }
    }

    /// The root a machine started without (from a boot template, or booted to save one): the
    /// disks to put into its empty drives and mount once its agent is ready.
    struct PendingRoot {
        var disks: [String]
        var template: BootTemplate
        /// Restored from the template (false: booted, and the template is to be saved).
        var restored: Bool
    }

    private func runOnce(io: IO, templates: TemplateUse) throws -> Outcome {
        // Process start, the runtime and the arguments: what is left is the library's work.
        var marks: [(name: String, time: UInt64)] = [("process", MonotonicClock.now)]
        let consoleLog = showConsole ? nil : ConsoleLog()
        let port: InProcessPort
        let (vm, defaultRequest, pendingRoot, network): (Machine, ExecRequest, PendingRoot?, MachineNetwork?)
        do throws(SwiftletError) {
            port = try InProcessPort(port: AgentPort.number)
            (vm, defaultRequest, pendingRoot, network) = try makeMachine(io: io, consoleOutput: showConsole ? 2 : consoleLog?.fd, port: port,
                                                                       templates: templates)
        } catch {
            throw Failure.setup(error)
        }
        // passt lives as long as the run (and no longer: it is stopped with this value).
        defer { withExtendedLifetime(network) {} }
        var request = defaultRequest
        let fromSnapshot = if case .snapshot = root { true } else { false }
        marks.append((!fromSnapshot && pendingRoot?.restored != true ? "image" : "snapshot", MonotonicClock.now))

        let machineThread: MachineThread, watchdog: Watchdog
        do throws(SwiftletError) {
            machineThread = try MachineThread(vm, confined: confined)
            watchdog = try Watchdog(milliseconds: timeoutMilliseconds) { vm.stop() }
        } catch {
            throw Failure.setup(error)
        }
        defer {
            watchdog.cancel()
            machineThread.stop()
        }

        func timedOut() -> Failure {
            Failure(reason: .timedOut, message: "the command did not finish within \(timeoutMilliseconds ?? 0) ms; the VM was stopped")
        }
        func machineFailure() -> Failure {
            switch machineThread.wait() {
            case .failure(let error):
                return Failure.setup(error)
            case .success(let report):
                if watchdog.fired { return timedOut() }
                return Failure(reason: .guest, message: report.exit.isClean ? "the guest stopped before its agent answered (\(report.exit))" : report.exit.description,
                               consoleTail: consoleLog?.tail())
            }
        }
        /// A restored template that ends before its agent is ready is not the user's failure.
        func templateFailed() -> TemplateRestoreFailure? {
            guard let pendingRoot, pendingRoot.restored, !watchdog.fired else { return nil }
            machineThread.stop()
            return TemplateRestoreFailure(template: pendingRoot.template)
        }
        // The agent's first session (after a restore, the one its new random seed goes to): only a
        // connection that proves it is the agent's is taken.
        let opened: AgentSession?
        do {
            opened = try AgentSession.open(on: port, for: vm, cancel: machineThread.ended, connected: {
                if !marks.contains(where: { $0.name == "connected" }) { marks.append(("connected", MonotonicClock.now)) }
            })
        } catch {
            if let failure = templateFailed() { throw failure }
            throw Failure(reason: .guest, message: error.description)
        }
        guard let session = opened else {
            if let failure = templateFailed() { throw failure }
            throw machineFailure()
        }
        // Every run from one snapshot starts from the same kernel random state: reseed it.
        if fromSnapshot || pendingRoot?.restored == true {
            do { try session.announceNewIdentity(hostname: nil) } catch {
                throw Failure(reason: .guest, message: error.description)
            }
        }
        marks.append(("ready", MonotonicClock.now))
        func failure(_ error: SwiftletError) -> Failure {
            Failure(reason: .guest, message: error.description, consoleTail: consoleLog?.tail())
        }
        if let pendingRoot {
            if !pendingRoot.restored {
                // The guest's interface comes up before the template is saved: the runs restored
                // from it find it up (bringing it up is most of what setting it up costs) and are
                // sent the setup again only for their root's files and their own passt.
                if let network {
                    do throws(SwiftletError) { try network.ready() } catch { throw Failure.setup(error) }
                    do throws(SwiftletError) { try network.configureGuest(through: session) } catch { throw failure(error) }
                }
                // Saving is an optimisation for later runs: this one goes on without it.
                do { try pendingRoot.template.save(vm) } catch { io.log("warning: cannot save the boot template (later runs boot too): \(error)") }
                marks.append(("template", MonotonicClock.now))
            }
            if let network {
                do throws(SwiftletError) { try network.ready() } catch { throw Failure.setup(error) }
                marks.append(("passt", MonotonicClock.now))
            }
            do throws(SwiftletError) {
                for (index, disk) in pendingRoot.disks.enumerated() { try vm.insertDisk(at: index, DiskConfig(path: disk, readOnly: true)) }
                try session.mountRoot(devices: pendingRoot.disks.indices.map(RootFilesystem.deviceName), network: network?.setup)
            } catch {
                throw failure(error)
            }
            marks.append((network == nil ? "root" : "root+network", MonotonicClock.now))
        } else if let network {
            do throws(SwiftletError) { try network.ready() } catch { throw Failure.setup(error) }
            do throws(SwiftletError) { try network.configureGuest(through: session) } catch { throw failure(error) }
            marks.append(("network", MonotonicClock.now))
        }

        io.beforeCommand()
        let size = terminal ? io.windowSize?() : nil
        request.terminal = terminal
        request.rows = size?.rows ?? 24
        request.columns = size?.columns ?? 80
        let outcome: AgentSession.Outcome
        do {
            outcome = try session.run(request, streams: .init(input: io.input, output: io.output, error: io.error,
                                                              signals: io.signals, windowSize: io.windowSize))
        } catch {
            if watchdog.fired { throw timedOut() }
            // What broke the session, then how the machine ended.
            var failure = machineFailure()
            failure.cause = error.description
            throw failure
        }
        marks.append(("command", MonotonicClock.now))
        // The first run from a snapshot records what it wrote; later runs copy that in as they start.
        // Only a hint: a snapshot directory this user cannot write to goes without.
        if fromSnapshot || pendingRoot?.restored == true { _ = try? vm.saveWorkingSet() }
        if case .success(let report) = machineThread.stop() { marks.insert(("vm", report.firstRun), at: 2) }
        marks.append(("teardown", MonotonicClock.now))
        return Outcome(status: outcome.status, failure: outcome.failure, marks: marks)
    }

    /// The machine the command runs in, booted from the default image, a root filesystem or an
    /// image (or restored from their boot template), or restored from a snapshot; and the
    /// command as it runs there.
    private func makeMachine(io: IO, consoleOutput: Int32?, port: InProcessPort,
                             templates: TemplateUse) throws(SwiftletError) -> (Machine, ExecRequest, PendingRoot?, MachineNetwork?) {
        let image: String?, rootfs: String?, policy: PullPolicy, insecure: Bool
        let log = io.log
        switch root {
        case .snapshot(let directory):
            if cpuTemplate != nil {
                throw SwiftletError(.invalidArgument, "--cpu-template shapes a machine that boots: the snapshot's machine keeps the CPU it was made with")
            }
            if !volumes.isEmpty {
                throw SwiftletError(.invalidArgument, "--volume gives a booting machine host directories: a snapshot's machine keeps the devices it was made with")
            }
            var policy = network
            if !policy.hasNetwork, let saved = try Machine.network(ofSnapshot: directory) { policy = saved.policy }
            let attached = policy.hasNetwork ? try MachineNetwork(policy: policy, logFile: nil) : nil
            let vm = try Machine.restoring(from: directory, consoleOutput: consoleOutput, kvmPath: AgentPort.kvmPath,
                                           allowPVM: allowPVM, vsockPorts: port, diffable: false, prefetchWorkingSet: true,
                                           readOnlyDisks: snapshotDisks ?? SnapshotPaths.resolver, network: attached?.device(log: log),
                                           lazyMemory: snapshotMemory)
            let defaults = try AgentSnapshot.defaults(of: vm, directory: directory)
            return (vm, try defaults.request(command: command, environment: environment, workdir: workingDirectory, user: user, what: directory),
                    nil, attached)
        case .pack: (image, rootfs, policy, insecure) = (nil, nil, .never, false) // an image pack (run(io:) unpacked it)
        case .defaultImage: (image, rootfs, policy, insecure) = (nil, nil, .missing, false)
        case .rootfs(let path): (image, rootfs, policy, insecure) = (nil, path, .missing, false)
        case .image(let reference, let pull, let insecureRegistry): (image, rootfs, policy, insecure) = (reference, nil, pull, insecureRegistry)
        }
        let root: RootFilesystem
        if let packed = packedImage?.root {
            root = packed
        } else {
            root = try RootFilesystem.resolve(image: image, rootfs: rootfs, insecure: insecure, policy: policy,
                                              signals: io.signals ?? -1, progress: io.log)
        }
        let kernel = packedImage?.kernel ?? self.kernel
        let request = try root.defaults.request(command: command, environment: environment, workdir: workingDirectory, user: user, what: root.name)
        // passt starts before the machine is built: it sets itself up while the machine is made and boots.
        let attached = network.hasNetwork ? try MachineNetwork(policy: network, logFile: nil) : nil
        guard templates != .none else {
            var config = try root.agentMachineConfig(kernel: kernel, cpus: cpus, memoryMiB: memoryMiB, allowPVM: allowPVM, consoleOutput: consoleOutput,
                                                     agentInitrd: packedImage?.agent, cpuTemplate: cpuTemplate ?? packedImage?.cpuTemplate)
            config.network = attached?.device(log: log)
            try VolumeMount.validate(volumes)
            config.share(volumes)
            return (Machine(config: config, vsockPorts: port), request, nil, attached)
        }
        var config = try root.agentMachineConfig(kernel: kernel, cpus: cpus, memoryMiB: memoryMiB,
                                                 allowPVM: allowPVM, consoleOutput: consoleOutput, emptyDrives: true, agentInitrd: packedImage?.agent,
                                                 cpuTemplate: cpuTemplate ?? packedImage?.cpuTemplate)
        config.network = attached?.device(log: log)
        let template = BootTemplate(config: config, contents: packedImage?.contents ?? [:])
        if templates == .restoreOrSave && template.exists {
            do {
                let vm = try Machine.restoring(from: template.directory.path, consoleOutput: consoleOutput, kvmPath: AgentPort.kvmPath,
                                               allowPVM: allowPVM, vsockPorts: port, diffable: false, prefetchWorkingSet: true,
                                               network: config.network)
                return (vm, request, PendingRoot(disks: root.disks, template: template, restored: true), attached)
            } catch {
                template.remove() // damaged or from another Swiftlet: boot and save a new one
            }
        }
        return (Machine(config: config, vsockPorts: port), request, PendingRoot(disks: root.disks, template: template, restored: false), attached)
    }
}
