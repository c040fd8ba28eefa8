import FoundationEssentials
import Hypervisor
import Glibc
import Images
import SwiftletNet
import SwiftletSystem
import VMM

/// Exit statuses of Swiftlet's processes (documented in the README): a machine's VMM process
/// ends with them, and `swiftlet` exits with them.
public enum ExitStatus {
    /// Bad input, missing kernel, no KVM: Swiftlet could not start the guest.
    public static let setupFailed: Int32 = 1
    /// The guest crashed: kernel panic, triple fault, emulation failure.
    public static let guestCrashed: Int32 = 2
    /// A run's time limit passed.
    public static let timedOut: Int32 = 124
}

/// Long-lived machines in `$SWIFTLET_HOME/machines` (`swiftlet machine ...`): each has a name,
/// an image, and a writable disk of its own for everything written inside it. A started machine
/// runs in a VMM process of its own (no daemon), reached through a control socket in its
/// directory. Every call blocks its thread until done: call them off Swift's cooperative pool.
///
/// A program that starts machines must answer `MachineServer.invocation` (the VMM process is
/// the same program started again): call `MachineServer.serveIfAsked()` first thing in `main`.
public enum Machines {
    /// What a new machine is made of.
    public struct Creation: Sendable {
        public var name: String
        public var root: CommandRun.Root
        public var kernel: String?
        public var cpus = 1
        public var memoryMiB = 256
        /// The writable disk's size (sparse: it takes what is written).
        public var diskMiB = 2048
        /// What the machine's network may reach (the default: no network device).
        public var network = NetworkConfiguration()
        /// The CPU baseline its guest is shown (nil: the host's CPU as KVM offers it).
        public var cpuTemplate: CPUTemplate?
        /// Host directories its guest sees (`--volume`), mounted at every start.
        public var volumes: [VolumeMount] = []

        public init(name: String, root: CommandRun.Root = .defaultImage) {
            self.name = name; self.root = root
        }
    }

    /// Makes the machine (not started): its directory, its writable ext4 disk and its record.
    /// A name that is taken is refused; on failure nothing of it is left.
    @discardableResult
    public static func create(_ creation: Creation, progress: @escaping @Sendable (String) -> Void = { _ in }) throws(SwiftletError) -> MachineRecord {
        guard creation.cpus >= 1, creation.cpus <= MachineConfig.maximumCPUs else {
            throw SwiftletError(.invalidArgument, "--cpus must be 1 to \(MachineConfig.maximumCPUs)")
        }
        guard creation.memoryMiB >= MachineConfig.minimumMemoryMiB else {
            throw SwiftletError(.invalidArgument, "--memory must be at least \(MachineConfig.minimumMemoryMiB) MiB")
        }
        guard creation.diskMiB >= 64, creation.diskMiB <= 16 << 20 else {
            throw SwiftletError(.invalidArgument, "--disk-size must be 64 MiB to 16 TiB")
        }
        try VolumeMount.validate(creation.volumes)
        let image: String?, rootfs: String?, policy: PullPolicy, insecure: Bool
        switch creation.root {
        case .defaultImage: (image, rootfs, policy, insecure) = (nil, nil, .missing, false)
        case .rootfs(let path): (image, rootfs, policy, insecure) = (nil, FileTree.absolute(path), .missing, false)
        case .image(let reference, let pull, let insecureRegistry): (image, rootfs, policy, insecure) = (reference, nil, pull, insecureRegistry)
        case .snapshot, .pack: throw SwiftletError(.invalidArgument, "a machine is created from an image; `restore` makes one of a machine's snapshot")
        }
        let directory = try MachineDirectory(name: creation.name)
        return try MachineDirectory.withLock { () throws(SwiftletError) -> MachineRecord in
            try directory.makeNew()
            do throws(SwiftletError) {
                var root = try RootFilesystem.resolve(image: image, rootfs: rootfs, insecure: insecure, policy: policy, progress: progress)
                root.disks = root.disks.map(absolute)
                guard root.disks.count < MachineConfig.maximumDisks else {
                    throw SwiftletError(.unsupported, "\(image ?? "the image") needs \(root.disks.count) layer disks: a machine has room for \(MachineConfig.maximumDisks - 1) beside its own disk")
                }
                if let kernel = creation.kernel, access(kernel, R_OK) != 0 { throw SwiftletError(.notFound, "no kernel at \(kernel)") }
                try makeWritableDisk(directory.diskPath, megabytes: creation.diskMiB)
                let record = MachineRecord(
                    name: creation.name, source: image ?? rootfs ?? "default", layers: root.disks, defaults: root.defaults, cpus: creation.cpus,
                    memoryMiB: creation.memoryMiB, kernel: creation.kernel.map(absolute), diskMiB: creation.diskMiB, created: Int(time(nil)),
                    network: creation.network.hasNetwork ? creation.network : nil, cpuTemplate: creation.cpuTemplate,
                    volumes: creation.volumes.isEmpty ? nil : creation.volumes)
                try directory.writeRecord(record)
                return record
            } catch {
                try? MachineDirectory.removeTree(directory.path)
                throw error
            }
        }
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
        let status = ChildProcess.wait(pid)
        guard status == 0 else { throw SwiftletError(.systemCall, "mke2fs could not format the machine's disk (status \(status))") }
    }

    /// Starts the machine in a VMM process of its own and returns once its agent is ready.
    /// Returns a note for the user when its last VMM process had crashed.
    @discardableResult
    public static func start(_ name: String, timeoutMilliseconds: Int = 120_000) throws(SwiftletError) -> String? {
        let directory = try MachineDirectory(name: name)
        _ = try directory.record()
        var note: String?
        switch directory.state {
        case .running: throw SwiftletError(.invalidArgument, "machine \(directory.name) is already running")
        case .crashed(let pid):
            note = "machine \(directory.name)'s last VMM process (pid \(pid)) ended without stopping the machine; starting it again"
        case .stopped: break
        }
        var record = try directory.record()
        guard record.restoresPack == true else {
            try MachineLifecycle.Launch(directory).waitUntilReady(milliseconds: timeoutMilliseconds)
            return note
        }
        // Made from a pack: this start goes on where the pack's machine was; later ones boot.
        try MachineLifecycle.Launch(directory, from: directory.packPath + "/snapshot", diffable: true)
            .waitUntilReady(milliseconds: timeoutMilliseconds)
        record.restoresPack = nil
        try directory.writeRecord(record)
        return note
    }

    /// Shuts the machine down cleanly, by force after `timeoutMilliseconds`; returns how it ended.
    @discardableResult
    public static func stop(_ name: String, timeoutMilliseconds: Int = 10_000) throws(SwiftletError) -> String {
        let directory = try MachineDirectory(name: name)
        _ = try directory.record()
        return try MachineLifecycle.stop(directory, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Removes a stopped machine and its disk; `force` stops it first if it runs.
    public static func remove(_ name: String, force: Bool = false) throws(SwiftletError) {
        let directory = try MachineDirectory(name: name)
        guard directory.exists || (force && access(directory.path, F_OK) == 0) else { _ = try directory.record(); return }
        if case .running = directory.state {
            guard force else {
                throw SwiftletError(.invalidArgument, "machine \(directory.name) is running: stop it first (`swiftlet machine stop \(directory.name)`) or use `rm -f`")
            }
            try MachineLifecycle.stop(directory, timeoutMilliseconds: 0)
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
    }

    /// Pauses a running machine: its vCPUs stop and its devices go quiet.
    public static func pause(_ name: String) throws(SwiftletError) {
        _ = try MachineLifecycle.request(try MachineDirectory(name: name), ControlRequest(.pause))
    }

    public static func resume(_ name: String) throws(SwiftletError) {
        _ = try MachineLifecycle.request(try MachineDirectory(name: name), ControlRequest(.resume))
    }

    /// Asks a running machine's guest to keep only `mebibytes` of its memory: its balloon takes
    /// the rest and the host gets it back; its full memory (or more) gives everything back. The
    /// guest follows within seconds (`status(_:).balloonMiB`), and may take pages back under
    /// memory pressure. Not kept across a restart: a machine starts with all its memory.
    @discardableResult
    public static func setMemory(_ name: String, mebibytes: Int) throws(SwiftletError) -> MemoryStatus {
        guard mebibytes >= MachineConfig.minimumMemoryMiB else {
            throw SwiftletError(.invalidArgument, "a memory target of \(mebibytes) MiB is below the \(MachineConfig.minimumMemoryMiB) MiB a guest needs")
        }
        var request = ControlRequest(.memory)
        request.memoryTargetMiB = mebibytes
        let reply = try MachineLifecycle.request(try MachineDirectory(name: name), request)
        guard let memory = reply.memory else { throw SwiftletError(.invalidFormat, "machine \(name) did not report its memory") }
        return memory
    }

    /// Whether the machine runs, how its last run ended, and its shape.
    public static func status(_ name: String) throws(SwiftletError) -> MachineSummary {
        let directory = try MachineDirectory(name: name)
        return MachineSummary(directory, record: try directory.record())
    }

    /// Every machine, by name (machines whose record cannot be read are left out).
    public static func list() -> [MachineSummary] {
        MachineDirectory.all().compactMap { directory in (try? directory.record()).map { MachineSummary(directory, record: $0) } }
    }
}

/// `path` made absolute (relative to the working directory) and resolved, for a record read from anywhere.
func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : GuestAssets.resolve(path) ?? path
}
