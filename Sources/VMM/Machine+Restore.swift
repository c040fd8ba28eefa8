import Devices
import Glibc
import GuestMemory
import Hypervisor
import LinuxBoot
import MachineState
import SwiftletNet
import SwiftletSystem

/// A snapshot to start a machine from, read and checked.
struct RestorePlan: Sendable {
    let snapshot: MachineSnapshot
    let directory: SnapshotDirectory
    /// The memory files, full first, then each diff on top.
    let memoryChain: [String]
    /// Whether the restored machine tracks the pages it writes, so that its next snapshot can be
    /// a diff of this one (KVM's dirty log costs a write fault per page first written).
    var diffable = true
    /// Whether the restore makes private copies of the snapshot's recorded working set up front.
    var prefetchesWorkingSet = false
    /// Where the memory comes from when it is not the snapshot's memory file: a source read
    /// lazily, a chunk as the guest first touches it (`LazyMemory`).
    var lazyMemory: (any MemoryImageSource)?

    /// The working set recorded beside the snapshot, if there is one that belongs to it: a hint,
    /// so anything unreadable counts as none.
    func recordedWorkingSet(pageCount: Int) -> WorkingSet? {
        let path = directory.workingSetPath
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

    /// Refuses a snapshot whose guest saw CPU features this host cannot give it, or a CPU of
    /// another vendor (`CPUContract`).
    func checkCPU(supported: [CPUIDEntry]) throws(SwiftletError) {
        try snapshot.cpuContract.check(supported: supported, what: "the snapshot in \(directory)")
    }

    func matchTSC(_ vcpu: any HypervisorVCPU, scaling: Bool, warn: (String) -> Void) throws(SwiftletError) {
        try Machine.matchTSC(vcpu, guestKHz: snapshot.tscKHz, scaling: scaling, warn: warn)
    }

    /// The network device the restored machine gets: `given` with the snapshot's MAC and MTU.
    /// A snapshot with a NIC needs a backend for it, and one without takes none.
    func checkedNetwork(_ given: NetworkDeviceConfig?) throws(SwiftletError) -> NetworkDeviceConfig? {
        switch (snapshot.hardware.network, given) {
        case (nil, nil): return nil
        case (nil, _?):
            throw SwiftletError(.invalidArgument, "the machine in the snapshot in \(directory.path) has no network device: it cannot be given a network when restored")
        case (_?, nil):
            throw SwiftletError(.invalidArgument, "the machine in the snapshot in \(directory.path) has a network device: restore it with a network backend for it")
        case (let saved?, var config?):
            guard saved.mtu >= Int(VirtioNet.minimumMTU), saved.mtu <= Int(UInt16.max) else {
                throw SwiftletError(.invalidFormat, "the snapshot in \(directory.path) records a network MTU of \(saved.mtu)")
            }
            config.guest.guestMAC = saved.mac
            config.guest.mtu = saved.mtu
            return config
        }
    }

    /// Checks that `given` are directories for the volumes the snapshot's machine shared: as
    /// many, each read-only where that one was (the guest mounted it so). A snapshot never says
    /// where they were: the caller gives them.
    func checkVolumes(_ given: [SharedVolume]) throws(SwiftletError) {
        let saved = snapshot.hardware.volumes ?? []
        guard given.count == saved.count else {
            throw SwiftletError(.invalidArgument, saved.isEmpty
                ? "the machine in the snapshot in \(directory.path) shared no host directories: it cannot be given \(given.count) when restored"
                : "the machine in the snapshot in \(directory.path) shared \(saved.count) host \(saved.count == 1 ? "directory" : "directories") (--volume), but \(given.count) \(given.count == 1 ? "was" : "were") given: a snapshot does not hold them, so a restore must be given the same ones again")
        }
        for (index, (volume, directoryGiven)) in zip(saved, given).enumerated() where volume.readOnly != directoryGiven.readOnly {
            throw SwiftletError(.invalidArgument, "volume \(index + 1) of the machine in the snapshot in \(directory.path) was \(volume.readOnly ? "read-only" : "writable"), but \(directoryGiven.path) was given \(directoryGiven.readOnly ? "read-only" : "writable"): its guest mounted it as it was")
        }
    }

    /// The file in the snapshot's directory that holds writable disk `disk`, checked: a `disk-N`
    /// name, a regular file (not a symbolic link or a device) of the size the state records.
    func checkedWritableDisk(_ disk: SnapshotDisk) throws(SwiftletError) -> String {
        guard let name = disk.file, !disk.readOnly else {
            throw SwiftletError(.invalidFormat, "\(directory.statePath) describes a read-only disk with a file in the snapshot: only writable disks have one")
        }
        let path = try directory.diskPath(named: name)
        let size = try OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY, what: "the snapshot's disk file").size()
        guard size == disk.size else {
            throw SwiftletError(.invalidFormat, "\(path) is \(size) bytes, but the disk it holds was \(disk.size): the snapshot is damaged")
        }
        return path
    }

    /// The file to open for read-only disk `disk`, which the state names by the path it had:
    /// what `resolver` makes of that path, a regular file of the size the state records. A
    /// writable disk named by path is refused: a restore never opens one from a path the state names.
    func checkedReadOnlyDisk(_ disk: SnapshotDisk, resolver: SnapshotDiskResolver) throws(SwiftletError) -> String {
        guard disk.readOnly else {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) names a writable disk by a host path (\(disk.path)), which is refused: a snapshot holds its writable disks' contents in its own directory")
        }
        let path: String
        do { path = try resolver.resolve(disk.path) } catch {
            throw SwiftletError(error.code, "cannot restore the snapshot in \(directory): \(error.message)")
        }
        let file: OwnedFileDescriptor
        do { file = try OwnedFileDescriptor.open(path, flags: O_RDONLY | O_NONBLOCK, what: "disk") } catch {
            guard error.cause == .noSuchFileOrDirectory else { throw error }
            throw SwiftletError(.notFound, "the disk \(path) that the snapshot in \(directory) was taken with is gone (an image layer removed from the image store? Pulling the image again brings it back)")
        }
        guard try file.isRegularFile() else {
            throw SwiftletError(.invalidFormat, "the disk \(path) that the snapshot in \(directory) names is not a regular file (a device or FIFO), which is refused")
        }
        let size = try file.size()
        guard size == disk.size else {
            throw SwiftletError(.invalidFormat, "disk \(path) is \(size) bytes, but was \(disk.size) when the snapshot in \(directory) was taken: the guest would see another disk")
        }
        return path
    }

    /// Reads the state file in `directory` and those of the snapshots it is a diff of.
    static func load(_ directory: SnapshotDirectory) throws(SwiftletError) -> RestorePlan {
        let snapshot = try readState(directory)
        var chain = [directory.memoryPath]
        var current = snapshot
        var seen: Set<SnapshotID> = [snapshot.id]
        while current.kind == .diff {
            guard let parentPath = current.parentDirectory, let parentID = current.parent else {
                throw SwiftletError(.invalidFormat, "\(directory.statePath) is a diff snapshot without a parent")
            }
            let parentDirectory = SnapshotDirectory(parentPath)
            let parent: MachineSnapshot
            do { parent = try readState(parentDirectory) } catch {
                throw SwiftletError(error.code, "the snapshot in \(directory) is a diff of \(parentDirectory), which cannot be read: \(error.message)")
            }
            guard parent.id == parentID, seen.insert(parent.id).inserted else {
                throw SwiftletError(.invalidFormat, "\(parentDirectory) no longer holds snapshot \(parentID), which \(directory) is a diff of")
            }
            chain.insert(parentDirectory.memoryPath, at: 0)
            current = parent
        }
        return RestorePlan(snapshot: snapshot, directory: directory, memoryChain: chain)
    }

    static func readState(_ directory: SnapshotDirectory) throws(SwiftletError) -> MachineSnapshot {
        let path = directory.statePath
        guard directory.exists else {
            throw SwiftletError(.notFound, access(directory.path, F_OK) == 0
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
    /// The snapshot is untrusted input: its writable disks must be `disk-N` regular files in its
    /// directory, of the sizes it recorded, and its read-only disks (named by the paths they had)
    /// are opened only where `readOnlyDisks` says, read-only; a snapshot that names a writable
    /// disk by path is refused.
    /// A machine that had a network device gets one again, joined to `network`'s backend under
    /// `network`'s policy (its MAC and MTU stay the snapshot's: the guest's driver knows them);
    /// its open flows are gone. One without gets none (`network` must be nil).
    /// A machine that shared host directories is given them again as `volumes` (as many, read-only
    /// where they were): the files its guest held there are looked up again by name beneath them;
    /// those that are gone give the guest ESTALE (or EBADF for an open one).
    /// With `prefetchWorkingSet`, the pages a restore of this snapshot wrote before (recorded by
    /// `saveWorkingSet()`) are copied out of the snapshot by a thread beside the starting guest,
    /// so that its writes there do not each fault in the host; for short runs that repeat the same
    /// work (`swiftlet run --from`), not for machines that live long.
    /// `alreadyRead`: the snapshot as `readSnapshot(directory)` read it (its state is not read again).
    public static func restoring(from directory: String, consoleOutput: Int32? = 1, consoleInput: Int32? = nil,
                                 kvmPath: String = "/dev/kvm", allowPVM: Bool = false,
                                 vsockPorts: (any VsockHostPorts)? = nil, vsockForwards: [UInt32: String] = [:],
                                 diffable: Bool = true, writableDisks: [DiskConfig]? = nil,
                                 prefetchWorkingSet: Bool = false, readOnlyDisks: SnapshotDiskResolver = .none,
                                 network: NetworkDeviceConfig? = nil, volumes: [SharedVolume] = [],
                                 lazyMemory: (any MemoryImageSource)? = nil,
                                 hypervisor: @escaping HypervisorProvider = Machine.defaultHypervisor,
                                 alreadyRead: ReadSnapshot? = nil) throws(SwiftletError) -> Machine {
        var plan: RestorePlan
        if let alreadyRead {
            guard alreadyRead.plan.directory.path == SnapshotDirectory(directory).path else {
                throw SwiftletError(.invalidArgument, "the snapshot read in \(alreadyRead.plan.directory) is not the one in \(directory)")
            }
            plan = alreadyRead.plan
        } else {
            plan = try RestorePlan.load(SnapshotDirectory(directory))
        }
        let nic = try plan.checkedNetwork(network)
        try plan.checkVolumes(volumes)
        plan.diffable = diffable
        plan.prefetchesWorkingSet = prefetchWorkingSet
        if let lazyMemory {
            guard plan.snapshot.kind == .full else {
                throw SwiftletError(.invalidArgument, "the snapshot in \(directory) is a diff: only a full snapshot's memory can be read lazily")
            }
            plan.lazyMemory = lazyMemory
        }
        let hardware = plan.snapshot.hardware
        let copies = try writableDiskFiles(plan)
        if let writableDisks, writableDisks.count != copies.count {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) has \(copies.count) writable disks, but \(writableDisks.count) were given for them")
        }
        var disks: [DiskConfig] = []
        for disk in hardware.disks {
            if disk.path.isEmpty && disk.file == nil {
                disks.append(.empty)
                continue
            }
            if disk.file != nil {
                let source = try plan.checkedWritableDisk(disk)
                var given = writableDisks?[disks.count(where: { !$0.readOnly })] ?? DiskConfig(path: "", base: source)
                given.readOnly = false
                disks.append(given)
            } else {
                disks.append(DiskConfig(path: try plan.checkedReadOnlyDisk(disk, resolver: readOnlyDisks), readOnly: true))
            }
        }
        let shape = MachineShape(cpuCount: hardware.cpuCount, memoryMiB: hardware.memoryMiB, disks: disks,
                                 entropyDevice: hardware.entropyDevice,
                                 vsock: hardware.vsockGuestCID.map { VsockConfig(guestCID: $0, forwards: vsockForwards) },
                                 network: nic, balloon: hardware.balloon ?? false, volumes: volumes, kvmPath: kvmPath, allowPVM: allowPVM, consoleOutput: consoleOutput, consoleInput: consoleInput)
        return Machine(restoring: plan, shape: shape, vsockPorts: vsockPorts, hypervisor: hypervisor)
    }


    /// A snapshot read and checked once (`readSnapshot`): what it holds, and what a restore of it
    /// is given (`restoring(from:…alreadyRead:)`) not to read its state again.
    public struct ReadSnapshot: Sendable {
        let plan: RestorePlan
        /// What the snapshot recorded (`snapshot(to:annotations:)`).
        public var annotations: [String: String] { plan.snapshot.annotations }
        /// Its writable disks' files (`disk-N` in its directory), checked.
        public func writableDiskFiles() throws(SwiftletError) -> [String] { try Machine.writableDiskFiles(plan) }
    }

    /// Reads and checks the snapshot in `directory` (its state file, once).
    public static func readSnapshot(_ directory: String) throws(SwiftletError) -> ReadSnapshot {
        ReadSnapshot(plan: try RestorePlan.load(SnapshotDirectory(directory)))
    }

    /// The restore builder: assembles a machine of the snapshot's shape over its memory (mapped
    /// copy-on-write), then puts back the vCPUs, the interrupt controllers and clock, and every
    /// device's state by its id.
    func buildFromSnapshot(_ plan: RestorePlan, controller: MachineController, phases: inout [(name: String, end: UInt64)],
                           onBootMarker: (@Sendable (UInt64) -> Void)?) throws(SwiftletError) -> BuiltMachine {
        let hypervisor = try openHypervisor(shape)
        if plan.snapshot.guestIsLinux, !shape.allowPVM, hypervisor.requiresParavirtualizedGuest {
            throw SwiftletError(.unsupported, Self.pvmMessage(kvmPath: shape.kvmPath))
        }
        try shape.validate()
        let parts = try Self.assemble(shape, hypervisor: hypervisor, controller: controller, vsockPorts: vsockPorts,
                                      logDirtyPages: plan.diffable, phases: &phases, onBootMarker: onBootMarker) { ranges throws(SwiftletError) in
            guard let source = plan.lazyMemory else { return try plan.mapMemory(expecting: ranges) }
            let lazy = try LazyMemory(source: source, id: plan.snapshot.id, what: "the memory of the snapshot in \(plan.directory)") { error in
                controller.stop(.vmmError("the machine's memory could not be read: \(error.message)"))
            }
            guard lazy.memory.regions.map(\.start) == ranges.map(\.0), lazy.memory.regions.map(\.size) == ranges.map(\.1) else {
                throw SwiftletError(.invalidFormat, "the memory of the snapshot in \(plan.directory) does not have the layout of a \(plan.snapshot.hardware.memoryMiB) MiB machine")
            }
            lazyMemory.withLock { $0 = lazy }
            return lazy.memory
        }
        do throws(SwiftletError) {
            var prefetch: [Range<Int>] = []
            if plan.prefetchesWorkingSet, let set = plan.recordedWorkingSet(pageCount: parts.memory.pageCount) {
                workingSetLoaded.withLock { $0 = true }
                prefetch = set.runs
            }
            phases.append(("load", MonotonicClock.now))
            try plan.checkCPU(supported: parts.supportedCPUID)
            // The guest's clock moves on by the time since the snapshot (restoreState below, with
            // advanceClock); its TSCs move on by as much, so its timers agree with its clock.
            let sinceSnapshot = parts.vm.timeSinceSave(plan.snapshot.vm)
            var vcpus: [any HypervisorVCPU] = []
            for id in 0..<shape.cpuCount {
                let vcpu = try parts.vm.createVCPU(id: UInt32(id))
                try vcpu.setCPUID(plan.snapshot.cpuid[id])
                try plan.matchTSC(vcpu, scaling: hypervisor.supports(.tscScaling)) { controller.warn($0) }
                try vcpu.restoreState(plan.snapshot.vcpus[id], advancingTSCBy: sinceSnapshot)
                vcpus.append(vcpu)
            }
            try parts.vm.restoreState(plan.snapshot.vm, advanceClock: true)
            try parts.devices.restoreStates(plan.snapshot.devices, from: "the snapshot in \(plan.directory)")
            if plan.diffable { parts.memory.startTrackingWrites() }
            return BuiltMachine(parts: parts, vcpus: vcpus, cpuid: plan.snapshot.cpuid, guestIsLinux: plan.snapshot.guestIsLinux,
                                prefetch: prefetch)
        } catch {
            parts.tearDown()
            throw error
        }
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
        try OwnedFileDescriptor.writeSmallFileAtomically(restore.directory.workingSetPath, set.encode())
        workingSetLoaded.withLock { $0 = true }
        return set.pages
    }

    /// The files in the snapshot in `directory` that hold its writable disks' contents, in disk
    /// order: a restore's `writableDisks` can be copies of them, or overlays over them.
    public static func writableDiskFiles(inSnapshot directory: String) throws(SwiftletError) -> [String] {
        try writableDiskFiles(try RestorePlan.load(SnapshotDirectory(directory)))
    }

    static func writableDiskFiles(_ plan: RestorePlan) throws(SwiftletError) -> [String] {
        var files: [String] = []
        for disk in plan.snapshot.hardware.disks where disk.file != nil {
            files.append(try plan.checkedWritableDisk(disk))
        }
        return files
    }

    /// The files that make up the (full) snapshot in `directory`, read and checked without
    /// restoring it, for copying it whole (a pack): its writable disks' files (`disk-N` in the
    /// directory), and its read-only disks by the paths it recorded, which are untrusted (resolve
    /// them as a restore would, `SnapshotDiskResolver`) and in disk order. A diff is refused: it
    /// needs its parent, which it names by a path on the host that made it.
    public static func files(ofSnapshot directory: String) throws(SwiftletError) -> (writable: [String], readOnly: [String]) {
        let plan = try RestorePlan.load(SnapshotDirectory(directory))
        guard plan.snapshot.kind == .full else {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) is a diff of another: only a full snapshot can be copied whole (restore it and take a full snapshot)")
        }
        return (try writableDiskFiles(plan), plan.snapshot.hardware.disks.filter(\.readOnly).map(\.path))
    }

    /// The network device of the machine in the snapshot in `directory` (nil: it had none), read
    /// and checked without restoring it: its policy is what the machine ran under.
    public static func network(ofSnapshot directory: String) throws(SwiftletError) -> SnapshotNetwork? {
        try RestorePlan.load(SnapshotDirectory(directory)).snapshot.hardware.network
    }

    /// What the snapshot in `directory` recorded (`snapshot(to:annotations:)`), read and checked
    /// (a damaged or foreign snapshot throws) without restoring it.
    public static func annotations(ofSnapshot directory: String) throws(SwiftletError) -> [String: String] {
        try RestorePlan.load(SnapshotDirectory(directory)).snapshot.annotations
    }

    /// The CPU the memory of the snapshot in `directory` depends on (its guest's features and
    /// vendor, its TSC frequency), read and checked without restoring it.
    public static func cpuContract(ofSnapshot directory: String) throws(SwiftletError) -> CPUContract {
        try RestorePlan.load(SnapshotDirectory(directory)).snapshot.cpuContract
    }

    /// What the snapshot this machine was restored from recorded (`snapshot(to:annotations:)`).
    public var restoredAnnotations: [String: String] { restore?.snapshot.annotations ?? [:] }
}

extension Machine {
    /// Runs `vcpu`'s TSC at `guestKHz`, the frequency the guest calibrated against, when the
    /// host's differs by more than `CPUContract.tscTolerancePPM` and the hypervisor can scale
    /// it (`scaling`); when it cannot, the machine runs on with a warning (its clock, kvmclock,
    /// is right; timers it programs in TSC cycles fire early or late by the ratio).
    static func matchTSC(_ vcpu: any HypervisorVCPU, guestKHz: UInt64?, scaling: Bool, warn: (String) -> Void) throws(SwiftletError) {
        guard let saved = guestKHz, saved > 0, let here = try? vcpu.tscKHz(), !CPUContract.sameTSC(saved, here) else { return }
        if scaling {
            try vcpu.setTSCKHz(saved)
        } else {
            warn("the snapshot's guest ran with a \(saved) kHz TSC and this host's is \(here) kHz, which its KVM cannot scale: timers the guest sets in TSC cycles run \(here > saved ? "early" : "late")")
        }
    }
}
