import Devices
import Glibc
import Virtio
import GuestMemory
import KVM
import LinuxBoot
import MachineState
import Synchronization
import SwiftletSystem

/// The hardware a snapshot was taken of; a restore builds the same.
public struct SnapshotHardware: Codable, Sendable, Equatable {
    public var cpuCount: Int
    public var memoryMiB: Int
    /// The disks: read-only ones by path (their contents are not part of the snapshot), writable
    /// ones with a copy of their contents in the snapshot.
    public var disks: [SnapshotDisk]
    public var entropyDevice: Bool
    /// The vsock device's guest CID, if the machine has one. Its connections are not kept: the
    /// guest is told they were reset.
    public var vsockGuestCID: UInt64?

    init(_ config: MachineConfig, diskSizes: [UInt64]) {
        cpuCount = config.cpuCount
        memoryMiB = config.memoryMiB
        disks = zip(config.disks, diskSizes).map { SnapshotDisk(path: $0.path, readOnly: $0.readOnly, size: $1, file: nil) }
        entropyDevice = config.entropyDevice
        vsockGuestCID = config.vsock?.guestCID
    }
}

/// A disk of a snapshotted machine.
public struct SnapshotDisk: Codable, Sendable, Equatable {
    /// Where the machine's disk was (for a copy-on-write disk, its overlay).
    public var path: String
    public var readOnly: Bool
    public var size: UInt64
    /// For a writable disk: the file in the snapshot's directory that holds its contents as they
    /// were when the snapshot was taken (a sparse file).
    public var file: String?
}

/// Everything the state file of a snapshot holds (docs/snapshot-format.md).
struct MachineSnapshot: Codable, Sendable {
    var id: SnapshotID
    var kind: MemoryFile.Kind
    /// For a diff: the snapshot it is a diff of, and that snapshot's directory (absolute).
    var parent: SnapshotID?
    var parentDirectory: String?
    /// Host CLOCK_REALTIME when taken (ns).
    var createdAt: UInt64
    var hardware: SnapshotHardware
    /// Whether the guest is a Linux kernel (which a PVM-backed /dev/kvm cannot run).
    var guestIsLinux: Bool
    /// The CPUID each vCPU saw: a restore shows the guest the same CPU.
    var cpuid: [[CPUIDEntry]]
    var vcpus: [VCPUState]
    var vm: VMState
    var serial: SerialState
    /// The virtio devices' transports and queues, in device order.
    var devices: [VirtioTransportState]
    /// What the snapshot's maker recorded with it (the CLI: the image's command defaults).
    var annotations: [String: String]
}

/// A full snapshot holds all of guest memory; a diff only the pages written since the machine's
/// previous snapshot (or its restore), and needs that snapshot to restore.
public enum SnapshotKind: Sendable {
    case full
    case diff
}

/// What taking a snapshot did.
public struct SnapshotReport: Sendable {
    public var id: String
    public var directory: String
    public var kind: SnapshotKind
    /// Guest memory pages written, and bytes written in all (state file included).
    public var memoryPagesWritten: Int
    public var bytesWritten: UInt64
    /// How long the guest was paused for the snapshot (ns), pausing and resuming included.
    public var pausedNanoseconds: UInt64
}

/// The parts of a running machine that pause and snapshot work on.
struct LiveMachine: @unchecked Sendable {
    // SAFETY (Sendable): VCPU handles are used by other threads only while their threads are parked
    // (the controller's pause), which orders those uses after the vCPU thread's own.
    let vm: VirtualMachine
    let vcpus: [VCPU]
    let memory: GuestMemory
    let serial: Serial8250
    let transports: [VirtioMMIOTransport]
    let controller: MachineController
    let cpuid: [[CPUIDEntry]]
    let msrIndices: [UInt32]
    let hasXSave: Bool
    /// Changes when a disk goes into an empty drive.
    var hardware: SnapshotHardware
    let guestIsLinux: Bool
    /// Whether the memory slots log dirty pages (from the first snapshot or the restore on).
    var dirtyLogging: Bool
    /// The snapshot a diff would be taken against: the last one taken or restored.
    var lastSnapshot: (id: SnapshotID, directory: String)?
    /// Pages written since `lastSnapshot` that a failed snapshot took from the dirty logs: the
    /// next diff must still include them.
    var carriedDirtyPages: [UInt64]?
}

/// A snapshot to start a machine from, read and checked.
struct RestorePlan: Sendable {
    let snapshot: MachineSnapshot
    let directory: String
    /// The memory files, full first, then each diff on top.
    let memoryChain: [String]
    /// Whether the restored machine tracks the pages it writes, so that its next snapshot can be
    /// a diff of this one (KVM's dirty log costs a write fault per page first written).
    var diffable = true
    /// Whether the restore makes private copies of the snapshot's recorded working set up front.
    var prefetchesWorkingSet = false

    /// The working set recorded beside the snapshot, if there is one that belongs to it: a hint,
    /// so anything unreadable counts as none.
    func recordedWorkingSet(pageCount: Int) -> WorkingSet? {
        let path = directory + "/" + WorkingSet.fileName
        guard let bytes = try? OwnedFileDescriptor.readSmallFile(path, limit: 64 << 20) else { return nil }
        return try? WorkingSet.decode(bytes, path: path, snapshot: snapshot.id, pageCount: pageCount)
    }

    func mapMemory(expecting ranges: [(GuestAddress, UInt64)]) throws(SwiftletError) -> GuestMemory {
        let memory = try MemoryFile.map(chain: memoryChain, id: snapshot.id)
        guard memory.regions.map(\.start) == ranges.map(\.0), memory.regions.map(\.size) == ranges.map(\.1) else {
            throw SwiftletError(.invalidFormat, "the memory file in \(directory) does not have the layout of a \(snapshot.hardware.memoryMiB) MiB machine")
        }
        return memory
    }

    /// Refuses a snapshot whose guest saw CPU features this host cannot give it.
    func checkCPU(supported: [CPUIDEntry]) throws(SwiftletError) {
        guard let guest = snapshot.cpuid.first else { return }
        // The feature registers (not identification or sizes), and the bits Swiftlet sets itself
        // whatever the host (hypervisor, TSC deadline and HTT in leaf 1), which are not host features.
        let features: [(function: UInt32, index: UInt32, name: String, register: KeyPath<CPUIDEntry, UInt32>, ignored: UInt32)] = [
            (0x1, 0, "ECX", \.ecx, CPUIDSetup.leaf1HypervisorBit | CPUIDSetup.leaf1TSCDeadlineBit),
            (0x1, 0, "EDX", \.edx, CPUIDSetup.leaf1HTTBit),
            (0x7, 0, "EBX", \.ebx, 0), (0x7, 0, "ECX", \.ecx, 0), (0x7, 0, "EDX", \.edx, 0),
            (0xD, 1, "EAX", \.eax, 0),
            (0x8000_0001, 0, "ECX", \.ecx, 0), (0x8000_0001, 0, "EDX", \.edx, 0),
        ]
        for feature in features {
            func leaf(_ entries: [CPUIDEntry]) -> CPUIDEntry? {
                entries.first { $0.function == feature.function && $0.index == feature.index }
            }
            guard let saved = leaf(guest) else { continue }
            let missing = saved[keyPath: feature.register] & ~feature.ignored & ~(leaf(supported)?[keyPath: feature.register] ?? 0)
            guard missing == 0 else {
                let bits = (0..<32).filter { missing >> $0 & 1 != 0 }.map(String.init).joined(separator: ", ")
                throw SwiftletError(.unsupported, "the snapshot in \(directory) was taken on a CPU with features this host's KVM does not offer (CPUID 0x\(String(feature.function, radix: 16)).\(feature.index) \(feature.name) bit \(bits)): restore it on a host with the same or a newer CPU")
            }
        }
    }

    /// Reads the state file in `directory` and those of the snapshots it is a diff of.
    static func load(_ directory: String) throws(SwiftletError) -> RestorePlan {
        let snapshot = try readState(directory)
        var chain = [directory + "/memory"]
        var current = snapshot
        var seen: Set<SnapshotID> = [snapshot.id]
        while current.kind == .diff {
            guard let parentDirectory = current.parentDirectory, let parentID = current.parent else {
                throw SwiftletError(.invalidFormat, "\(directory)/state is a diff snapshot without a parent")
            }
            let parent: MachineSnapshot
            do { parent = try readState(parentDirectory) } catch {
                throw SwiftletError(error.code, "the snapshot in \(directory) is a diff of \(parentDirectory), which cannot be read: \(error.message)")
            }
            guard parent.id == parentID, seen.insert(parent.id).inserted else {
                throw SwiftletError(.invalidFormat, "\(parentDirectory) no longer holds snapshot \(parentID), which \(directory) is a diff of")
            }
            chain.insert(parentDirectory + "/memory", at: 0)
            current = parent
        }
        return RestorePlan(snapshot: snapshot, directory: directory, memoryChain: chain)
    }

    static func readState(_ directory: String) throws(SwiftletError) -> MachineSnapshot {
        let path = directory + "/state"
        guard access(path, F_OK) == 0 else {
            throw SwiftletError(.notFound, access(directory, F_OK) == 0
                ? "\(directory) is not a Swiftlet snapshot: it has no state file"
                : "snapshot \(directory) does not exist")
        }
        let bytes = try OwnedFileDescriptor.readSmallFile(path, limit: 64 << 20)
        let snapshot = try StateFile.decode(MachineSnapshot.self, from: bytes, path: path)
        guard snapshot.vcpus.count == snapshot.hardware.cpuCount, snapshot.cpuid.count == snapshot.hardware.cpuCount else {
            throw SwiftletError(.invalidFormat, "\(path) describes \(snapshot.hardware.cpuCount) vCPUs but holds the state of \(snapshot.vcpus.count)")
        }
        return snapshot
    }
}

extension Machine {
    /// A machine that starts from the snapshot in `directory` instead of booting: guest memory is
    /// mapped copy-on-write from the snapshot's memory file (nothing is copied; pages load on first
    /// touch), and vCPUs and devices continue where they were. The snapshot is never modified.
    /// `allowPVM` restores a Linux guest even on a PVM-backed /dev/kvm (only PVM-enabled kernels run there).
    /// A vsock device comes back with no connections (its guest is told they were reset); guest
    /// connections to the host go to `vsockPorts`, then to `vsockForwards`. With `diffable`, the
    /// machine tracks what it writes so that its next snapshot can be a diff of this one; a
    /// machine that will not be snapshotted runs faster without (no write fault per first write).
    /// The snapshot's writable disks come back as `writableDisks` (one per writable disk, in order:
    /// copies of `writableDiskFiles(inSnapshot:)`, or copy-on-write overlays with those as their
    /// base); without them, as overlays in temporary files, whose writes are lost when the machine ends.
    /// With `prefetchWorkingSet`, the pages a restore of this snapshot wrote before (recorded by
    /// `saveWorkingSet()`) are copied out of the snapshot by a thread beside the starting guest,
    /// so that its writes there do not each fault in the host; for short runs that repeat the same
    /// work (`swiftlet run --from`), not for machines that live long.
    public static func restoring(from directory: String, consoleOutput: Int32? = 1, consoleInput: Int32? = nil,
                                 kvmPath: String = "/dev/kvm", allowPVM: Bool = false,
                                 vsockPorts: (any VsockHostPorts)? = nil, vsockForwards: [UInt32: String] = [:],
                                 diffable: Bool = true, writableDisks: [DiskConfig]? = nil,
                                 prefetchWorkingSet: Bool = false) throws(SwiftletError) -> Machine {
        var plan = try RestorePlan.load(absolutePath(directory))
        plan.diffable = diffable
        plan.prefetchesWorkingSet = prefetchWorkingSet
        let hardware = plan.snapshot.hardware
        let deviceCount = hardware.disks.count + (hardware.entropyDevice ? 1 : 0) + (hardware.vsockGuestCID != nil ? 1 : 0)
        guard plan.snapshot.devices.count == deviceCount else {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) does not hold the state of all its devices")
        }
        let copies = writableDiskFiles(plan)
        if let writableDisks, writableDisks.count != copies.count {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) has \(copies.count) writable disks, but \(writableDisks.count) were given for them")
        }
        var disks: [DiskConfig] = []
        for disk in hardware.disks {
            if disk.path.isEmpty && disk.file == nil {
                disks.append(.empty)
                continue
            }
            let source = disk.file.map { plan.directory + "/" + $0 } ?? disk.path
            if disk.file == nil && access(source, F_OK) != 0 && errno == ENOENT {
                throw SwiftletError(.notFound, "the disk \(source) that the snapshot in \(directory) was taken with is gone (an image layer removed from the image store? Pulling the image again brings it back at the same path)")
            }
            let size = try OwnedFileDescriptor.open(source, flags: O_RDONLY, what: "disk").size()
            guard size == disk.size else {
                throw SwiftletError(.invalidFormat, disk.file == nil
                    ? "disk \(disk.path) is \(size) bytes, but was \(disk.size) when the snapshot in \(directory) was taken: the guest would see another disk"
                    : "\(source) is \(size) bytes, but the disk it holds was \(disk.size): the snapshot is damaged")
            }
            if disk.file == nil {
                disks.append(DiskConfig(path: disk.path, readOnly: disk.readOnly))
            } else {
                var given = writableDisks?[disks.count(where: { !$0.readOnly })] ?? DiskConfig(path: "", base: source)
                given.readOnly = false
                disks.append(given)
            }
        }
        let config = MachineConfig(kernelPath: "", cpuCount: hardware.cpuCount, memoryMiB: hardware.memoryMiB, kvmPath: kvmPath,
                                   allowPVM: allowPVM, consoleOutput: consoleOutput, consoleInput: consoleInput,
                                   disks: disks,
                                   entropyDevice: hardware.entropyDevice,
                                   vsock: hardware.vsockGuestCID.map { VsockConfig(guestCID: $0, forwards: vsockForwards) })
        return Machine(config: config, vsockPorts: vsockPorts, restore: plan)
    }

    /// Records the pages the guest (and its devices) wrote since this machine was restored as its
    /// snapshot's working set, in the snapshot directory, unless the restore found one there:
    /// later restores with `prefetchWorkingSet` copy those pages in as the guest starts.
    /// Call it once the machine has done what a typical run does (after the command, say). A run
    /// that wrote more than a quarter of guest memory records an empty set (nothing to copy in).
    /// Returns the pages recorded, or nil when there was nothing to record (not restored,
    /// restored without `prefetchWorkingSet`, or a working set was already there). Never touches
    /// the snapshot's own files; a snapshot directory that is not writable gives an error.
    @discardableResult
    public func saveWorkingSet() throws(SwiftletError) -> Int? {
        guard let restore, restore.prefetchesWorkingSet, workingSetLoaded.withLock({ !$0 }) else { return nil }
        let memory = try liveMachine().memory
        let written = try memory.writtenPageRuns()
        // A run that wrote more than a quarter of memory is not a working set to copy in on every
        // restore: record an empty one, so that later runs neither copy nor record.
        let pages = written.reduce(0) { $0 + $1.count }
        let set = try WorkingSet(snapshot: restore.snapshot.id, pageCount: memory.pageCount,
                                 runs: pages > memory.pageCount / 4 ? [] : written)
        // Concurrent runs may record at once: each writes its own temporary file, the last rename wins.
        try OwnedFileDescriptor.writeSmallFileAtomically(restore.directory + "/" + WorkingSet.fileName, set.encode())
        workingSetLoaded.withLock { $0 = true }
        return set.pages
    }

    /// The files in the snapshot in `directory` that hold its writable disks' contents, in disk
    /// order: a restore's `writableDisks` can be copies of them, or overlays over them.
    public static func writableDiskFiles(inSnapshot directory: String) throws(SwiftletError) -> [String] {
        writableDiskFiles(try RestorePlan.load(absolutePath(directory)))
    }

    static func writableDiskFiles(_ plan: RestorePlan) -> [String] {
        plan.snapshot.hardware.disks.compactMap { disk in disk.file.map { plan.directory + "/" + $0 } }
    }

    /// What the snapshot in `directory` recorded (`snapshot(to:annotations:)`), read and checked
    /// (a damaged or foreign snapshot throws) without restoring it.
    public static func annotations(ofSnapshot directory: String) throws(SwiftletError) -> [String: String] {
        try RestorePlan.load(absolutePath(directory)).snapshot.annotations
    }

    /// What the snapshot this machine was restored from recorded (`snapshot(to:annotations:)`).
    public var restoredAnnotations: [String: String] { restore?.snapshot.annotations ?? [:] }

    /// Puts `disk` (read-only) into the machine's empty drive number `index` (`DiskConfig.empty`)
    /// while it runs: the guest is told the drive's configuration changed and sees the disk's
    /// capacity (Linux: "detected capacity change"). A machine restored from a snapshot with empty
    /// drives gets its disks this way, so one snapshot serves many disks. A snapshot taken
    /// afterwards records the disk.
    public func insertDisk(at index: Int, _ disk: DiskConfig) throws(SwiftletError) {
        guard disk.readOnly, !disk.isEmpty, disk.base == nil else {
            throw SwiftletError(.invalidArgument, "only a read-only disk image can go into an empty drive")
        }
        try operations.withLock { _ throws(SwiftletError) in
            let machine = try liveMachine()
            guard index >= 0, index < machine.hardware.disks.count, let device = machine.transports[index].device as? VirtioBlock else {
                throw SwiftletError(.invalidArgument, "the machine has no disk drive \(index)")
            }
            guard !machine.controller.isPaused else { throw SwiftletError(.invalidArgument, "the machine is paused: resume it first") }
            let backend = try Self.openDisk(disk)
            try device.insert(backend)
            live.withLock { $0?.hardware.disks[index] = SnapshotDisk(path: disk.path, readOnly: true, size: backend.byteCount, file: nil) }
            machine.transports[index].configurationChanged()
        }
    }

    /// Stops the guest's vCPUs until `resume()`: they park outside KVM_RUN. Devices served on vCPU
    /// threads (block, entropy) stay quiet with them; the vsock device stops moving host data into
    /// guest memory and catches up on resume. The guest's clocks keep running.
    /// Throws when the machine is not running (yet).
    public func pause() async throws(SwiftletError) {
        try await offCooperativePool { () throws(SwiftletError) in try self.pauseBlocking() }
    }

    public func resume() async throws(SwiftletError) {
        try await offCooperativePool { () throws(SwiftletError) in try self.resumeBlocking() }
    }

    public func pauseBlocking() throws(SwiftletError) {
        try operations.withLock { _ throws(SwiftletError) in try pauseLocked() }
    }

    public func resumeBlocking() throws(SwiftletError) {
        try operations.withLock { _ throws(SwiftletError) in
            let machine = try liveMachine()
            guard machine.controller.isPaused else { throw SwiftletError(.invalidArgument, "the machine is not paused") }
            Self.resume(machine)
        }
    }

    private func pauseLocked() throws(SwiftletError) {
        let machine = try liveMachine()
        switch machine.controller.pause() {
        case .paused:
            for transport in machine.transports { transport.device.setQuiesced(true) }
        case .stopped: throw SwiftletError(.invalidArgument, "the machine stopped before it could be paused")
        case .timedOut: throw SwiftletError(.systemCall, "the machine's vCPUs did not stop within 10 s (a device may be stuck); it keeps running")
        }
    }

    private static func resume(_ machine: LiveMachine) {
        for transport in machine.transports { transport.device.setQuiesced(false) }
        machine.controller.resume()
    }

    /// Writes a snapshot of the running machine to `directory`, which must not exist: vCPU and
    /// interrupt-controller state, device state and guest memory. The machine is paused for the
    /// snapshot and then continues (unless it was paused before). The directory appears complete
    /// or not at all.
    /// `annotations` are stored with it and come back as `restoredAnnotations` of a restore.
    /// A vsock device's connections are not part of the snapshot: a restore resets them.
    public func snapshot(to directory: String, kind: SnapshotKind = .full,
                         annotations: [String: String] = [:]) async throws(SwiftletError) -> SnapshotReport {
        try await offCooperativePool { () throws(SwiftletError) in
            try self.snapshotBlocking(to: directory, kind: kind, annotations: annotations)
        }
    }

    public func snapshotBlocking(to directory: String, kind: SnapshotKind = .full,
                                 annotations: [String: String] = [:]) throws(SwiftletError) -> SnapshotReport {
        try operations.withLock { _ throws(SwiftletError) in try snapshotLocked(to: directory, kind: kind, annotations: annotations) }
    }

    private func snapshotLocked(to directory: String, kind: SnapshotKind, annotations: [String: String]) throws(SwiftletError) -> SnapshotReport {
        let target = Self.absolutePath(directory)
        let machine = try liveMachine()
        if kind == .diff && machine.lastSnapshot == nil {
            throw SwiftletError(.invalidArgument, "a diff snapshot needs an earlier snapshot of this machine (or a restore) to be a diff of: take a full snapshot first")
        }
        if access(target, F_OK) == 0 {
            throw SwiftletError(.invalidArgument, "\(directory) already exists: snapshots go to a new directory")
        }
        let start = MonotonicClock.now
        let wasPaused = machine.controller.isPaused
        if !wasPaused { try pauseLocked() }
        defer { if !wasPaused { Self.resume(machine) } }

        let id = try SnapshotID.random()
        let partial = target + ".partial-\(getpid())"
        try systemCall("cannot create \(partial)") { mkdir(partial, 0o700) }
        var keep = false
        defer {
            if !keep {
                for (name, _) in OwnedFileDescriptor.directoryEntries(partial) ?? [] { unlink(partial + "/" + name) }
                rmdir(partial)
            }
        }

        var vcpus: [VCPUState] = []
        for vcpu in machine.vcpus {
            vcpus.append(try vcpu.saveState(msrIndices: machine.msrIndices, hasXSave: machine.hasXSave))
        }
        let vmState = try machine.vm.saveState(hasPIT: false)
        var devices: [VirtioTransportState] = []
        for transport in machine.transports { devices.append(try transport.saveState()) }
        // Writable disks are copied as they are now (their devices are quiet while paused).
        var hardware = machine.hardware
        var diskBytes: UInt64 = 0
        let blockDevices = machine.transports.compactMap { $0.device as? VirtioBlock }
        for (index, device) in blockDevices.enumerated() where !hardware.disks[index].readOnly {
            let name = "disk-\(index)"
            diskBytes += try device.backend.copy(to: partial + "/" + name)
            hardware.disks[index].file = name
        }
        let dirty = try collectDirtyPages(machine)
        defer {
            // A snapshot that failed after emptying the dirty logs hands their pages to the next one.
            if !keep, let dirty {
                live.withLock { m in
                    guard m != nil else { return }
                    var carried = m!.carriedDirtyPages ?? [UInt64](repeating: 0, count: dirty.count)
                    for i in dirty.indices { carried[i] |= dirty[i] }
                    m!.carriedDirtyPages = carried
                }
            }
        }
        let memoryStats: MemoryWriteStats
        var snapshot = MachineSnapshot(id: id, kind: .full, parent: nil, parentDirectory: nil, createdAt: Self.realtimeNow(),
                                       hardware: hardware, guestIsLinux: machine.guestIsLinux, cpuid: machine.cpuid, vcpus: vcpus, vm: vmState,
                                       serial: machine.serial.state, devices: devices, annotations: annotations)
        if kind == .diff, let last = machine.lastSnapshot, let dirty {
            snapshot.kind = .diff
            snapshot.parent = last.id
            snapshot.parentDirectory = last.directory
            memoryStats = try MemoryFile.write(machine.memory, to: partial + "/memory", id: id, diffFrom: last.id, dirty: dirty)
        } else {
            memoryStats = try MemoryFile.write(machine.memory, to: partial + "/memory", id: id)
        }
        let state = try StateFile.encode(snapshot)
        let stateFile = try OwnedFileDescriptor.open(partial + "/state", flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot state file")
        try stateFile.write(state, at: 0, what: partial + "/state")
        try systemCall("cannot sync \(partial)/state") { fsync(stateFile.rawValue) }
        try systemCall("cannot move the snapshot into \(directory)") { rename(partial, target) }
        keep = true
        Self.syncDirectory(containing: target)
        live.withLock { $0?.lastSnapshot = (id, target) }
        return SnapshotReport(id: id.description, directory: target, kind: snapshot.kind == .diff ? .diff : .full,
                              memoryPagesWritten: memoryStats.pagesWritten,
                              bytesWritten: memoryStats.bytesWritten + UInt64(state.count) + diskBytes, pausedNanoseconds: MonotonicClock.now - start)
    }

    /// How one copy made by `fork` is set up: where its console goes, who answers its guest's
    /// vsock connections, and where its writable disks keep what it writes (see `restoring`).
    public struct ForkOptions: Sendable {
        public var consoleOutput: Int32?
        public var vsockPorts: (any VsockHostPorts)?
        public var writableDisks: [DiskConfig]?

        public init(consoleOutput: Int32? = nil, vsockPorts: (any VsockHostPorts)? = nil, writableDisks: [DiskConfig]? = nil) {
            self.consoleOutput = consoleOutput; self.vsockPorts = vsockPorts; self.writableDisks = writableDisks
        }
    }

    /// `count` copies of this running machine as it is now, ready to `run()`: one full snapshot
    /// to `directory` (which must not exist; the machine pauses for it and goes on), then as many
    /// restores of it. The copies share the snapshot's memory copy-on-write (the host's page
    /// cache holds one copy of every page none of them wrote) and, by default, its writable
    /// disks as copy-on-write overlays in temporary files. Keep `directory` while copies are made
    /// from it; a running copy no longer needs its memory file. A guest with an agent should be
    /// told its new identity (`AgentSession.announceNewIdentity`) once its agent reconnects.
    public func fork(count: Int, snapshotDirectory directory: String,
                     options: @escaping @Sendable (Int) -> ForkOptions = { _ in ForkOptions() }) async throws(SwiftletError) -> [Machine] {
        try await offCooperativePool { () throws(SwiftletError) in
            try self.forkBlocking(count: count, snapshotDirectory: directory, options: options)
        }
    }

    public func forkBlocking(count: Int, snapshotDirectory directory: String,
                             options: (Int) -> ForkOptions = { _ in ForkOptions() }) throws(SwiftletError) -> [Machine] {
        guard count >= 1 else { throw SwiftletError(.invalidArgument, "a fork makes at least one copy (asked for \(count))") }
        _ = try snapshotBlocking(to: directory)
        var copies: [Machine] = []
        for index in 0..<count {
            let o = options(index)
            copies.append(try Self.restoring(from: directory, consoleOutput: o.consoleOutput, kvmPath: config.kvmPath,
                                             allowPVM: config.allowPVM, vsockPorts: o.vsockPorts,
                                             vsockForwards: config.vsock?.forwards ?? [:], diffable: false, writableDisks: o.writableDisks))
        }
        return copies
    }

    /// The pages written since the last snapshot (nil if dirty logging was off), and dirty logging
    /// switched on (with a clean log) for the next one. The machine is paused.
    private func collectDirtyPages(_ machine: LiveMachine) throws(SwiftletError) -> [UInt64]? {
        let totalPages = Int(machine.memory.totalSize / 4096)
        var combined: [UInt64]? = machine.dirtyLogging ? [UInt64](repeating: 0, count: (totalPages + 63) / 64) : nil
        var first = 0
        for (slot, region) in machine.memory.regions.enumerated() {
            let pages = Int(region.size / 4096)
            if machine.dirtyLogging {
                let bitmap = try machine.vm.dirtyPages(slot: UInt32(slot), pageCount: pages)
                for page in 0..<pages where bitmap[page / 64] >> UInt64(page % 64) & 1 != 0 {
                    combined![(first + page) / 64] |= 1 << UInt64((first + page) % 64)
                }
            } else {
                try machine.vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.start.rawValue, size: region.size,
                                               host: region.hostAddress, logDirtyPages: true)
            }
            first += pages
        }
        // Devices write guest memory too, which KVM's log does not see.
        let written = machine.memory.takeWrittenPages()
        let carried = live.withLock { m -> [UInt64]? in
            defer { m?.carriedDirtyPages = nil }
            return m?.carriedDirtyPages
        }
        if combined != nil {
            for i in written.indices { combined![i] |= written[i] }
            if let carried { for i in carried.indices { combined![i] |= carried[i] } }
        }
        machine.memory.startTrackingWrites()
        live.withLock { $0?.dirtyLogging = true }
        return combined
    }

    func liveMachine() throws(SwiftletError) -> LiveMachine {
        guard let machine = live.withLock({ $0 }) else {
            throw SwiftletError(.invalidArgument, "the machine is not running")
        }
        return machine
    }

    /// Runs blocking work on a dedicated thread, never on Swift's cooperative pool.
    func offCooperativePool<R: Sendable>(thread name: String = "swiftlet-ctl", _ body: @escaping @Sendable () throws(SwiftletError) -> R) async throws(SwiftletError) -> R {
        let result: Result<R, SwiftletError> = await withCheckedContinuation { continuation in
            do throws(SwiftletError) {
                _ = try OSThread.start(name: name) {
                    continuation.resume(returning: Result { () throws(SwiftletError) in try body() })
                }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get()
    }

    static func absolutePath(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return String(cString: cwd) + "/" + path
    }

    static func realtimeNow() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }

    static func syncDirectory(containing path: String) {
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let fd = open(parent.isEmpty ? "/" : parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { fsync(fd); close(fd) }
    }
}
