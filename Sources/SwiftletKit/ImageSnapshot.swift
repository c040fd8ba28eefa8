import FoundationEssentials
import Hypervisor
import Glibc
import SwiftletNet
import SwiftletSystem
import VMM

/// `swiftlet snapshot` as a use case: boots an image with the guest agent, waits until the agent
/// is ready, and writes a full snapshot of the machine, for `CommandRun(root: .snapshot(DIR))`.
public struct ImageSnapshot: Sendable {
    public var root: CommandRun.Root
    public var kernel: String?
    public var cpus = 1
    public var memoryMiB = 256
    /// The CPU baseline the machine's guest is shown (`--cpu-template`): a snapshot that moves
    /// to hosts of other CPU generations.
    public var cpuTemplate: CPUTemplate?
    public var allowPVM = false
    /// The guest console goes to standard error (else to a log shown when the guest fails).
    public var showConsole = false
    /// The machine's network (none by default): the snapshot keeps its NIC and this policy,
    /// which `run --from` uses unless it is given network options of its own.
    public var network = NetworkConfiguration()
    /// This process is only the snapshot's VMM process (the CLI's): it drops its capabilities
    /// before the machine's threads start and confines itself before the guest runs, as a `run`
    /// does (`CommandRun.confined`). Never in a process that goes on to do other work.
    public var confined = false

    public init(root: CommandRun.Root) {
        self.root = root
    }

    /// Writes the snapshot to `directory`, which must not exist. A guest that fails before its
    /// agent is ready gives an error with the end of its console in `consoleTail`.
    public func make(to directory: String, log: @escaping @Sendable (String) -> Void = { _ in }) throws(CommandRun.Failure) -> SnapshotReport {
        let root: RootFilesystem
        do throws(SwiftletError) {
            if access(directory, F_OK) == 0 {
                throw SwiftletError(.invalidArgument, "\(directory) already exists: snapshots go to a new directory")
            }
            let resolved: RootFilesystem
            switch self.root {
            case .snapshot, .pack: throw SwiftletError(.invalidArgument, "a snapshot is made from an image, not from another snapshot or a pack")
            case .defaultImage: resolved = try RootFilesystem.resolve(image: nil, rootfs: nil, progress: log)
            case .rootfs(let path): resolved = try RootFilesystem.resolve(image: nil, rootfs: path, progress: log)
            case .image(let reference, let policy, let insecure):
                resolved = try RootFilesystem.resolve(image: reference, rootfs: nil, insecure: insecure, policy: policy, progress: log)
            }
            root = resolved
        } catch {
            throw CommandRun.Failure.setup(error)
        }
        return try make(root, to: directory)
    }

    private func make(_ root: RootFilesystem, to directory: String) throws(CommandRun.Failure) -> SnapshotReport {
        func setup<T>(_ body: () throws(SwiftletError) -> T) throws(CommandRun.Failure) -> T {
            do { return try body() } catch { throw CommandRun.Failure.setup(error) }
        }
        let consoleLog = showConsole ? nil : ConsoleLog()
        let port = try setup { () throws(SwiftletError) in try InProcessPort(port: AgentPort.number) }
        // The machine's passt, for as long as the snapshot is being made.
        let network = try setup { () throws(SwiftletError) in
            self.network.hasNetwork ? try MachineNetwork(policy: self.network, logFile: nil) : nil
        }
        defer { network?.stop() }
        var config = try setup { () throws(SwiftletError) in
            try root.agentMachineConfig(kernel: kernel, cpus: cpus, memoryMiB: memoryMiB, allowPVM: allowPVM,
                                        consoleOutput: showConsole ? 2 : consoleLog?.fd, cpuTemplate: cpuTemplate)
        }
        config.network = network?.device(log: nil)
        let vm = Machine(config: config, vsockPorts: port)
        let machineThread = try setup { () throws(SwiftletError) in
            // Before the machine's threads start: none of them keeps a root's capabilities.
            if confined { try Confinement.dropCapabilities() }
            return try MachineThread(vm, confined: confined)
        }
        defer { machineThread.stop() }

        func failure(_ reason: String) -> CommandRun.Failure {
            switch machineThread.stop() {
            case .failure(let error): return CommandRun.Failure.setup(error)
            case .success(let report): return CommandRun.Failure(reason: .guest, message: "\(reason) (\(report.exit))", consoleTail: consoleLog?.tail())
            }
        }
        // Once the agent proved it holds its key (given to it here), the snapshot keeps the key.
        guard let session = try setup({ () throws(SwiftletError) in try AgentSession.open(on: port, for: vm, cancel: machineThread.ended) }) else {
            throw failure("the guest stopped before its agent was ready")
        }
        // The session stays open while the snapshot is taken: an agent whose connection closed powers off.
        defer { withExtendedLifetime(session) {} }
        if let network {
            // A port that cannot be bound is the caller's error; a guest that cannot configure its interface is the guest's.
            try setup { () throws(SwiftletError) in try network.ready() }
            do throws(SwiftletError) { try network.configureGuest(through: session) } catch { throw failure(error.description) }
        }
        return try setup { () throws(SwiftletError) in
            try vm.snapshotBlocking(to: directory, annotations: [AgentSnapshot.annotation: try AgentSnapshot.encode(root.defaults)])
        }
    }
}

/// What an agent snapshot stores for `run --from`: how commands run in its image.
enum AgentSnapshot {
    static let annotation = "swiftlet.agent.exec-defaults"

    static func encode(_ defaults: ExecDefaults) throws(SwiftletError) -> String {
        do { return String(decoding: try JSONEncoder().encode(defaults), as: UTF8.self) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the image's command defaults: \(error)")
        }
    }

    /// The defaults stored with the snapshot a machine was restored from.
    static func defaults(of machine: Machine, directory: String) throws(SwiftletError) -> ExecDefaults {
        guard let text = machine.restoredAnnotations[annotation] else {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) has no guest agent to run a command in: make one with `swiftlet snapshot`")
        }
        do { return try JSONDecoder().decode(ExecDefaults.self, from: Data(text.utf8)) } catch {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds unreadable command defaults: \(error)")
        }
    }
}
