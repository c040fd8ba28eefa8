import Devices
import Glibc
import SwiftletSystem

extension Machine {
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
            guard index >= 0, index < machine.devices.drives.count else {
                throw SwiftletError(.invalidArgument, "the machine has no disk drive \(index)")
            }
            let drive = machine.devices.drives[index]
            guard !machine.controller.isPaused else { throw SwiftletError(.invalidArgument, "the machine is paused: resume it first") }
            let backend = try Self.openDisk(disk)
            try drive.device.insert(backend)
            live.withLock { $0?.hardware.disks[index] = SnapshotDisk(path: disk.path, readOnly: true, size: backend.byteCount, file: nil) }
            drive.transport.configurationChanged()
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

    package func pauseBlocking() throws(SwiftletError) {
        try operations.withLock { _ throws(SwiftletError) in try pauseLocked() }
    }

    package func resumeBlocking() throws(SwiftletError) {
        try operations.withLock { _ throws(SwiftletError) in
            let machine = try liveMachine()
            guard machine.controller.isPaused else { throw SwiftletError(.invalidArgument, "the machine is not paused") }
            Self.resume(machine)
        }
    }

    func pauseLocked() throws(SwiftletError) {
        let machine = try liveMachine()
        switch machine.controller.pause() {
        case .paused:
            for transport in machine.devices.transports { transport.device.setQuiesced(true) }
        case .stopped: throw SwiftletError(.invalidArgument, "the machine stopped before it could be paused")
        case .timedOut: throw SwiftletError(.systemCall, "the machine's vCPUs did not stop within 10 s (a device may be stuck); it keeps running")
        }
    }

    static func resume(_ machine: LiveMachine) {
        for transport in machine.devices.transports { transport.device.setQuiesced(false) }
        machine.controller.resume()
    }

    /// How one copy made by `fork` is set up: where its console goes, who answers its guest's
    /// vsock connections, where its writable disks keep what it writes, and (for a machine with a
    /// network device) the backend its NIC is joined to, each copy its own (see `restoring`).
    public struct ForkOptions: Sendable {
        public var consoleOutput: Int32?
        public var vsockPorts: (any VsockHostPorts)?
        public var writableDisks: [DiskConfig]?
        public var network: NetworkDeviceConfig?

        public init(consoleOutput: Int32? = nil, vsockPorts: (any VsockHostPorts)? = nil, writableDisks: [DiskConfig]? = nil,
                    network: NetworkDeviceConfig? = nil) {
            self.consoleOutput = consoleOutput; self.vsockPorts = vsockPorts; self.writableDisks = writableDisks
            self.network = network
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

    package func forkBlocking(count: Int, snapshotDirectory directory: String,
                             options: (Int) -> ForkOptions = { _ in ForkOptions() }) throws(SwiftletError) -> [Machine] {
        guard count >= 1 else { throw SwiftletError(.invalidArgument, "a fork makes at least one copy (asked for \(count))") }
        _ = try snapshotBlocking(to: directory)
        // The copies open the read-only disks this machine has, and nothing else the state may name.
        let ownDisks = SnapshotDiskResolver.only(try liveMachine().hardware.disks.filter(\.readOnly).map(\.path))
        var copies: [Machine] = []
        for index in 0..<count {
            let o = options(index)
            copies.append(try Self.restoring(from: directory, consoleOutput: o.consoleOutput, kvmPath: shape.kvmPath,
                                             allowPVM: shape.allowPVM, vsockPorts: o.vsockPorts,
                                             vsockForwards: shape.vsock?.forwards ?? [:], diffable: false, writableDisks: o.writableDisks,
                                             readOnlyDisks: ownDisks, network: o.network, volumes: shape.volumes, hypervisor: openHypervisor))
        }
        return copies
    }

    func liveMachine() throws(SwiftletError) -> LiveMachine {
        guard let machine = live.withLock({ $0 }) else {
            throw SwiftletError(.invalidArgument, "the machine is not running")
        }
        return machine
    }

    /// Runs blocking work on a dedicated thread, never on Swift's cooperative pool.
    func offCooperativePool<R: Sendable>(thread name: String = "swiftlet-ctl", _ body: @escaping @Sendable () throws(SwiftletError) -> R) async throws(SwiftletError) -> R {
        try await OSThread.run(name: name, body)
    }
}
