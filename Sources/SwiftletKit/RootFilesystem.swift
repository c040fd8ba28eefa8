import AgentProtocol
import Hypervisor
import Glibc
import Images
import SwiftletSystem
import VMM

/// When an image is asked of its registry.
public enum PullPolicy: String, Sendable, CaseIterable {
    /// Only when the store does not have it.
    case missing
    case always
    case never
}

/// Where the guest agent listens, and which KVM device machines use.
public enum AgentPort {
    /// The vsock port the guest agent connects to on the host.
    public static let number: UInt32 = 1024

    /// The KVM device (SWIFTLET_KVM_DEVICE points tests elsewhere).
    public static var kvmPath: String { getenv("SWIFTLET_KVM_DEVICE").map { String(cString: $0) } ?? "/dev/kvm" }
}

/// How commands run in an image: its config's entrypoint, command, environment, working
/// directory and user. Stored with an agent snapshot, so `run --from` runs commands as the image would.
public struct ExecDefaults: Codable, Equatable, Sendable {
    public var entrypoint: [String]
    public var command: [String]
    public var environment: [String]
    public var workingDirectory: String
    public var user: String

    /// A root filesystem without an image config (the default image, --rootfs): `sh` as root in /.
    public static let plain = ExecDefaults(entrypoint: [], command: ["sh"], environment: [], workingDirectory: "/", user: "")

    public init(entrypoint: [String], command: [String], environment: [String], workingDirectory: String, user: String) {
        self.entrypoint = entrypoint; self.command = command; self.environment = environment
        self.workingDirectory = workingDirectory; self.user = user
    }

    public init(_ config: ImageConfiguration) {
        let execution = config.config
        self.init(entrypoint: execution?.Entrypoint ?? [], command: execution?.Cmd ?? [], environment: execution?.Env ?? [],
                  workingDirectory: (execution?.WorkingDir).flatMap { $0.isEmpty ? nil : $0 } ?? "/", user: execution?.User ?? "")
    }

    /// The exec request for `command` (the default command when empty) with the command line's
    /// -e, -w and -u over the image's. `what` names the image in errors.
    public func request(command: [String], environment: [String], workdir: String?, user: String?,
                 what: String) throws(SwiftletError) -> ExecRequest {
        let arguments = entrypoint + (command.isEmpty ? self.command : command)
        guard !arguments.isEmpty else {
            throw SwiftletError(.invalidArgument, "\(what) has no entrypoint or command: give one after --")
        }
        return ExecRequest(arguments: arguments, environment: ExecDefaults.merge(self.environment, environment),
                           workingDirectory: workdir ?? workingDirectory, user: user ?? self.user)
    }
}

/// The guest's root: read-only layer disks (bottom first) and how commands run on them.
public struct RootFilesystem: Sendable {
    public var disks: [String]
    public var defaults: ExecDefaults
    /// What the root is called in errors.
    public var name: String

    /// `swiftlet.root=` for the agent: the disks' guest devices, bottom first.
    public var deviceList: String { disks.indices.map(Self.deviceName).joined(separator: ",") }

    /// The guest device of the machine's disk number `index` (/dev/vda, /dev/vdb, ...).
    public static func deviceName(_ index: Int) -> String { "/dev/vd" + String(UnicodeScalar(UInt8(ascii: "a") + UInt8(index))) }

    /// The default image, `rootfs`, or `image` (pulled or imported into the store when needed).
    public static func resolve(image: String?, rootfs: String?, insecure: Bool = false, policy: PullPolicy = .missing, signals: Int32 = -1,
                               progress: @escaping @Sendable (String) -> Void = { _ in }) throws(SwiftletError) -> RootFilesystem {
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
                                     interruptions: signals >= 0 ? signals : nil, progress: progress)
        let resolved = try resolver.resolve(image)
        return RootFilesystem(disks: resolved.disks, defaults: ExecDefaults(resolved.configuration), name: image)
    }

    /// A machine that boots the guest agent on this root, its agent on vsock port `agentPort`.
    /// With `emptyDrives`, the machine boots with as many empty drives as the root has disks and
    /// no root on its command line: its agent waits in the initramfs for `mountRoot` (see `BootTemplate`).
    public func agentMachineConfig(kernel: String?, cpus: Int, memoryMiB: Int, allowPVM: Bool, consoleOutput: Int32?,
                            emptyDrives: Bool = false, agentInitrd: String? = nil, cpuTemplate: CPUTemplate? = nil) throws(SwiftletError) -> MachineConfig {
        let agent = agentInitrd ?? GuestAssets.agentInitrd
        guard access(agent, R_OK) == 0 else {
            throw SwiftletError(.notFound, "no guest agent initramfs at \(agent): build it with `make build`")
        }
        var config = MachineConfig(
            kernelPath: kernel ?? GuestAssets.defaultKernel(), initrdPath: agent,
            commandLine: MachineConfig.defaultCommandLine + (emptyDrives ? "" : " swiftlet.root=\(deviceList)") + " swiftlet.port=\(AgentPort.number)",
            cpuCount: cpus, memoryMiB: memoryMiB, allowPVM: allowPVM, consoleOutput: consoleOutput,
            consoleInput: nil, disks: disks.map { emptyDrives ? .empty : DiskConfig(path: $0, readOnly: true) }, entropyDevice: true,
            vsock: VsockConfig())
        config.kvmPath = AgentPort.kvmPath
        config.balloon = true
        config.cpuTemplate = cpuTemplate
        return config
    }
}

extension ExecDefaults {
    /// The image's environment with the command line's variables replacing the same names.
    public static func merge(_ base: [String], _ overrides: [String]) -> [String] {
        func name(_ variable: String) -> Substring { variable.split(separator: "=", maxSplits: 1).first ?? Substring(variable) }
        let replaced = Set(overrides.map(name))
        return base.filter { !replaced.contains(name($0)) } + overrides
    }
}
