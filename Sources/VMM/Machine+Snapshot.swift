import Devices
import Glibc
import GuestMemory
import Hypervisor
import MachineState
import SwiftletSystem

/// The parts of a running machine that pause and snapshot work on.
struct LiveMachine: @unchecked Sendable {
    // SAFETY (Sendable): vCPU handles are used by other threads only while their threads are parked
    // (the controller's pause), which orders those uses after the vCPU thread's own.
    let vm: any HypervisorVM
    let vcpus: [any HypervisorVCPU]
    let memory: GuestMemory
    let devices: MachineDevices
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
    var lastSnapshot: (id: SnapshotID, directory: SnapshotDirectory)?
    /// Pages written since `lastSnapshot` that a failed snapshot took from the dirty logs: the
    /// next diff must still include them.
    var carriedDirtyPages: [UInt64]?
}

extension Machine {
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

    package func snapshotBlocking(to directory: String, kind: SnapshotKind = .full,
                                 annotations: [String: String] = [:]) throws(SwiftletError) -> SnapshotReport {
        try operations.withLock { _ throws(SwiftletError) in try snapshotLocked(to: directory, kind: kind, annotations: annotations) }
    }

    private func snapshotLocked(to directory: String, kind: SnapshotKind, annotations: [String: String]) throws(SwiftletError) -> SnapshotReport {
        let target = SnapshotDirectory(directory)
        let machine = try liveMachine()
        if kind == .diff && machine.lastSnapshot == nil {
            throw SwiftletError(.invalidArgument, "a diff snapshot needs an earlier snapshot of this machine (or a restore) to be a diff of: take a full snapshot first")
        }
        if access(target.path, F_OK) == 0 {
            throw SwiftletError(.invalidArgument, "\(directory) already exists: snapshots go to a new directory")
        }
        let start = MonotonicClock.now
        let wasPaused = machine.controller.isPaused
        if !wasPaused { try pauseLocked() }
        defer { if !wasPaused { Self.resume(machine) } }

        let id = try SnapshotID.random()
        let partial = try target.makePartial()
        var keep = false
        defer { if !keep { partial.remove() } }

        let captured = try pausedState(machine, id: id, annotations: annotations)
        // Writable disks are copied as they are now (their devices are quiet while paused).
        var hardware = machine.hardware
        var diskBytes: UInt64 = 0
        for (index, drive) in machine.devices.drives.enumerated() where !hardware.disks[index].readOnly {
            let name = SnapshotDirectory.diskFileName(index)
            diskBytes += try drive.device.backend.copy(to: try partial.diskPath(named: name))
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
        var snapshot = captured
        snapshot.hardware = hardware
        if kind == .diff, let last = machine.lastSnapshot, let dirty {
            snapshot.kind = .diff
            snapshot.parent = last.id
            snapshot.parentDirectory = last.directory.path
            memoryStats = try MemoryFile.write(machine.memory, to: partial.memoryPath, id: id, diffFrom: last.id, dirty: dirty)
        } else {
            memoryStats = try MemoryFile.write(machine.memory, to: partial.memoryPath, id: id)
        }
        let state = try StateFile.encode(snapshot)
        let stateFile = try OwnedFileDescriptor.open(partial.statePath, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot state file")
        try stateFile.write(state, at: 0, what: partial.statePath)
        try systemCall("cannot sync \(partial.statePath)") { fsync(stateFile.rawValue) }
        try partial.commit(as: target)
        keep = true
        live.withLock { $0?.lastSnapshot = (id, target) }
        return SnapshotReport(id: id.description, directory: target.path, kind: snapshot.kind == .diff ? .diff : .full,
                              memoryPagesWritten: memoryStats.pagesWritten,
                              bytesWritten: memoryStats.bytesWritten + UInt64(state.count) + diskBytes, pausedNanoseconds: MonotonicClock.now - start)
    }

    /// The state of the paused `machine` as a full snapshot `id` (its vCPUs, interrupt
    /// controllers and devices; its disks as the machine has them, not yet copied anywhere).
    func pausedState(_ machine: LiveMachine, id: SnapshotID, annotations: [String: String]) throws(SwiftletError) -> MachineSnapshot {
        var vcpus: [VCPUState] = []
        for vcpu in machine.vcpus {
            vcpus.append(try vcpu.saveState(msrIndices: machine.msrIndices, hasXSave: machine.hasXSave))
        }
        return MachineSnapshot(id: id, kind: .full, parent: nil, parentDirectory: nil, createdAt: Self.realtimeNow(),
                               hardware: machine.hardware, guestIsLinux: machine.guestIsLinux, cpuid: machine.cpuid, vcpus: vcpus,
                               vm: try machine.vm.saveState(hasPIT: false), devices: try machine.devices.saveStates(),
                               annotations: annotations, agentKey: heldAgentKey, tscKHz: (try? machine.vcpus.first?.tscKHz()) ?? nil)
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
                                               host: region.hostAddress, logDirtyPages: true, readOnly: false)
            }
            first += pages
        }
        // Devices write guest memory too, which the hypervisor's log does not see.
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

    static func realtimeNow() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
