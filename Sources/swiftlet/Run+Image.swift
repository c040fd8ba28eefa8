import AgentProtocol
import ArgumentParser
import Glibc
import Images
import SwiftletSystem
import VMM

/// When `run --image` asks the registry.
enum PullPolicy: String, ExpressibleByArgument, CaseIterable {
    case missing, always, never
}

/// The flags `run`, `snapshot` and `machine create` share: what the guest's root is.
struct RootOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The image: a registry reference, an OCI layout directory, an image archive, or - (stdin).", valueName: "ref"))
    var image: String?

    @Option(help: ArgumentHelp("When to pull --image from its registry: missing (not in the store), always, never.", valueName: "policy"))
    var pull: PullPolicy = .missing

    @Flag(help: "Reach the image's registry over plain HTTP (loopback registries always are).")
    var insecureRegistry = false

    @Option(help: "A root filesystem image (EROFS or ext4) instead of the default busybox image.")
    var rootfs: String?

    func validate() throws {
        if image != nil && rootfs != nil { throw ValidationError("--image and --rootfs cannot be used together") }
    }
}

/// How commands run in an image: its config's entrypoint, command, environment, working
/// directory and user. Stored with an agent snapshot, so `run --from` runs commands as the image would.
struct ExecDefaults: Codable, Equatable {
    var entrypoint: [String]
    var command: [String]
    var environment: [String]
    var workingDirectory: String
    var user: String

    /// A root filesystem without an image config (the default image, --rootfs): `sh` as root in /.
    static let plain = ExecDefaults(entrypoint: [], command: ["sh"], environment: [], workingDirectory: "/", user: "")

    init(entrypoint: [String], command: [String], environment: [String], workingDirectory: String, user: String) {
        self.entrypoint = entrypoint; self.command = command; self.environment = environment
        self.workingDirectory = workingDirectory; self.user = user
    }

    init(_ config: ImageConfiguration) {
        let execution = config.config
        self.init(entrypoint: execution?.Entrypoint ?? [], command: execution?.Cmd ?? [], environment: execution?.Env ?? [],
                  workingDirectory: (execution?.WorkingDir).flatMap { $0.isEmpty ? nil : $0 } ?? "/", user: execution?.User ?? "")
    }

    /// The exec request for `command` (the default command when empty) with the command line's
    /// -e, -w and -u over the image's. `what` names the image in errors.
    func request(command: [String], environment: [String], workdir: String?, user: String?,
                 what: String) throws(SwiftletError) -> ExecRequest {
        let arguments = entrypoint + (command.isEmpty ? self.command : command)
        guard !arguments.isEmpty else {
            throw SwiftletError(.invalidArgument, "\(what) has no entrypoint or command: give one after --")
        }
        return ExecRequest(arguments: arguments, environment: Run.merge(self.environment, environment),
                           workingDirectory: workdir ?? workingDirectory, user: user ?? self.user)
    }
}

/// The guest's root: read-only layer disks (bottom first) and how commands run on them.
struct RootFilesystem {
    var disks: [String]
    var defaults: ExecDefaults
    /// What the root is called in errors.
    var name: String

    /// `swiftlet.root=` for the agent: the disks' guest devices, bottom first.
    var deviceList: String { disks.indices.map(Self.deviceName).joined(separator: ",") }

    /// The guest device of the machine's disk number `index` (/dev/vda, /dev/vdb, ...).
    static func deviceName(_ index: Int) -> String { "/dev/vd" + String(UnicodeScalar(UInt8(ascii: "a") + UInt8(index))) }

    /// The default image, `--rootfs`, or `image` (pulled or imported into the store when needed).
    static func resolve(_ options: RootOptions, image: String?, signals: Int32) throws(SwiftletError) -> RootFilesystem {
        try resolve(image: image, rootfs: options.rootfs, insecure: options.insecureRegistry, policy: options.pull, signals: signals)
    }

    static func resolve(image: String?, rootfs: String?, insecure: Bool, policy: PullPolicy, signals: Int32) throws(SwiftletError) -> RootFilesystem {
        guard let image else {
            let path = rootfs ?? GuestAssets.defaultImage
            guard access(path, R_OK) == 0 else {
                throw SwiftletError(.notFound, rootfs != nil ? "no root filesystem image at \(path): check the --rootfs path"
                                                             : "no default image at \(path): build it with `make build`")
            }
            return RootFilesystem(disks: [path], defaults: .plain, name: path)
        }
        let store = try ImageStore()
        precondition(ImageStore.maximumLayerDisks <= MachineConfig.maximumDisks, "an image's disks must fit the machine")
        let resolver = ImageResolver(store: store, insecure: insecure, policy: policy,
                                     interruptions: signals >= 0 ? signals : nil)
        let resolved = try resolver.resolve(image)
        return RootFilesystem(disks: resolved.disks, defaults: ExecDefaults(resolved.configuration), name: image)
    }

    /// A machine that boots the guest agent on this root, its agent on vsock port `Run.agentPort`.
    func agentMachineConfig(_ machine: MachineOptions, consoleOutput: Int32?) throws(SwiftletError) -> MachineConfig {
        try agentMachineConfig(kernel: machine.kernel, cpus: machine.cpus, memoryMiB: machine.memory, allowPVM: machine.allowPVM,
                               consoleOutput: consoleOutput)
    }

    /// With `emptyDrives`, the machine boots with as many empty drives as the root has disks and
    /// no root on its command line: its agent waits in the initramfs for `mountRoot` (see `BootTemplate`).
    func agentMachineConfig(kernel: String?, cpus: Int, memoryMiB: Int, allowPVM: Bool, consoleOutput: Int32?,
                            emptyDrives: Bool = false) throws(SwiftletError) -> MachineConfig {
        let agent = GuestAssets.agentInitrd
        guard access(agent, R_OK) == 0 else {
            throw SwiftletError(.notFound, "no guest agent initramfs at \(agent): build it with `make build`")
        }
        var config = MachineConfig(
            kernelPath: kernel ?? GuestAssets.defaultKernel(), initrdPath: agent,
            commandLine: MachineConfig.defaultCommandLine + (emptyDrives ? "" : " swiftlet.root=\(deviceList)") + " swiftlet.port=\(Run.agentPort)",
            cpuCount: cpus, memoryMiB: memoryMiB, allowPVM: allowPVM, consoleOutput: consoleOutput,
            consoleInput: nil, disks: disks.map { emptyDrives ? .empty : DiskConfig(path: $0, readOnly: true) }, entropyDevice: true,
            vsock: VsockConfig())
        config.kvmPath = Run.kvmPath
        return config
    }
}

extension Run {
    /// The KVM device (SWIFTLET_KVM_DEVICE points tests elsewhere).
    static var kvmPath: String { getenv("SWIFTLET_KVM_DEVICE").map { String(cString: $0) } ?? "/dev/kvm" }

    /// The root a machine started without (from a boot template, or booted to save one): the
    /// disks to put into its empty drives and mount once its agent is ready.
    struct PendingRoot {
        var disks: [String]
        var template: BootTemplate
        /// Restored from the template (false: booted, and the template is to be saved).
        var restored: Bool
    }

    /// The machine the command runs in, booted from the default image, --rootfs or --image (or
    /// restored from their boot template), or restored from --from; and the command as it runs there.
    func makeMachine(signals: Int32, consoleOutput: Int32?, port: InProcessPort,
                     templates: TemplateUse) throws(SwiftletError) -> (Machine, ExecRequest, PendingRoot?) {
        if let from {
            let vm = try Machine.restoring(from: from, consoleOutput: consoleOutput, kvmPath: Self.kvmPath,
                                           allowPVM: machine.allowPVM, vsockPorts: port, diffable: false, prefetchWorkingSet: true)
            let defaults = try AgentSnapshot.defaults(of: vm, directory: from)
            return (vm, try defaults.request(command: exec.command, environment: exec.environment, workdir: exec.workdir, user: exec.user, what: from), nil)
        }
        // A detached run's image was resolved by the process that started it.
        let image = getenv(Self.resolvedImageVariable).map { String(cString: $0) } ?? source.image
        let root = try RootFilesystem.resolve(source, image: image, signals: signals)
        let request = try root.defaults.request(command: exec.command, environment: exec.environment, workdir: exec.workdir, user: exec.user, what: root.name)
        guard templates != .none else {
            return (Machine(config: try root.agentMachineConfig(machine, consoleOutput: consoleOutput), vsockPorts: port), request, nil)
        }
        let config = try root.agentMachineConfig(kernel: machine.kernel, cpus: machine.cpus, memoryMiB: machine.memory,
                                                 allowPVM: machine.allowPVM, consoleOutput: consoleOutput, emptyDrives: true)
        let template = BootTemplate(config: config)
        if templates == .restoreOrSave && template.exists {
            do {
                let vm = try Machine.restoring(from: template.directory, consoleOutput: consoleOutput, kvmPath: Self.kvmPath,
                                               allowPVM: machine.allowPVM, vsockPorts: port, diffable: false, prefetchWorkingSet: true)
                return (vm, request, PendingRoot(disks: root.disks, template: template, restored: true))
            } catch {
                template.remove() // damaged or from another Swiftlet: boot and save a new one
            }
        }
        return (Machine(config: config, vsockPorts: port), request, PendingRoot(disks: root.disks, template: template, restored: false))
    }

    /// The image's environment with the command line's variables replacing the same names.
    static func merge(_ base: [String], _ overrides: [String]) -> [String] {
        func name(_ variable: String) -> Substring { variable.split(separator: "=", maxSplits: 1).first ?? Substring(variable) }
        let replaced = Set(overrides.map(name))
        return base.filter { !replaced.contains(name($0)) } + overrides
    }
}
