import Virtio
import CLinux
import Devices
import Glibc
import GuestMemory
import KVM
import LinuxBoot
import MachineState
import Synchronization
import SwiftletSystem

/// What happened during a run, for `--boot-timing`, benchmarks and callers of the library.
public struct MachineRunReport: Sendable {
    public var exit: MachineExit
    /// CLOCK_MONOTONIC readings (ns): process start, first KVM_RUN, boot marker, and the end.
    public var processStart: UInt64
    public var firstRun: UInt64
    public var bootMarker: UInt64?
    public var end: UInt64
    /// Returns from KVM_RUN to Swiftlet, over all vCPUs.
    public var exitsToUserspace: UInt64
    /// Guest memory resident on the host at the end (touched by guest or VMM).
    public var guestMemoryResidentBytes: Int
    /// Peak resident set of the whole process (VmHWM).
    public var peakResidentBytes: Int
    /// I/O port accesses by port, when tracing was asked for (SWIFTLET_TRACE_IO=1).
    public var portTrace: [UInt16: Int]
    /// When each set-up phase ended (CLOCK_MONOTONIC ns), in order: where the set-up time goes.
    public var phases: [(name: String, end: UInt64)]
    /// Device complaints during the run (a malformed request, a failed disk write), oldest first.
    public var warnings: [String]

    /// Peak RSS minus guest memory: what the VMM itself costs.
    public var vmmOverheadBytes: Int { max(0, peakResidentBytes - guestMemoryResidentBytes) }
}

/// A virtual machine that boots a Linux kernel on KVM and runs until the guest powers off,
/// reboots or crashes.
///
/// ```swift
/// let machine = Machine(config: MachineConfig(kernelPath: "vmlinux", initrdPath: "initrd.cpio"))
/// let report = try await machine.run()
/// print(report.exit)
/// ```
public final class Machine: Sendable {
    public let config: MachineConfig
    /// Where guest vsock connections go before `config.vsock`'s Unix socket forwards (an
    /// in-process agent channel, say).
    public let vsockPorts: (any VsockHostPorts)?
    /// The run in progress, for `stop()`.
    private let running = Mutex<MachineController?>(nil)
    private let stopRequested = Atomic<Bool>(false)
    /// The parts of a running machine that pause and snapshot work on.
    let live = Mutex<LiveMachine?>(nil)
    /// Held by pause, resume and snapshot, one at a time (a snapshot pauses and resumes itself).
    let operations = Mutex<Void>(())
    /// The snapshot this machine starts from instead of booting (`Machine.restoring(from:)`).
    let restore: RestorePlan?
    /// Whether the restore found the snapshot's working set (or this machine recorded it).
    let workingSetLoaded = Mutex<Bool>(false)

    /// Ports of the VMM's own devices.
    public enum Ports {
        public static let serial: UInt16 = 0x3F8
        public static let i8042: UInt16 = 0x60
        public static let bootMarker: UInt16 = BootMarker.port
        public static let pvpanic: UInt16 = 0x505
        public static let sleepControl: UInt16 = 0x600
    }
    /// COM1's interrupt.
    static let serialIRQ: UInt32 = 4
    /// The first GSI for virtio devices; each takes the next one.
    static let firstVirtioGSI: UInt32 = 5

    public init(config: MachineConfig, vsockPorts: (any VsockHostPorts)? = nil) {
        self.config = config
        self.vsockPorts = vsockPorts
        self.restore = nil
    }

    init(config: MachineConfig, vsockPorts: (any VsockHostPorts)?, restore: RestorePlan) {
        self.config = config
        self.vsockPorts = vsockPorts
        self.restore = restore
    }

    /// Stops the machine at once (its vCPUs leave the guest; no guest shutdown): the run ends
    /// with `.stopped`. Safe from any thread; a stop before the run starts ends it as soon as it does.
    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        running.withLock { $0?.stop(.stopped) }
    }

    /// Boots the machine and waits for it to stop, on a dedicated thread (never blocking Swift's
    /// cooperative pool). `onBootMarker` is called (on a vCPU thread) when the guest writes the marker.
    public func run(onBootMarker: (@Sendable (UInt64) -> Void)? = nil) async throws(SwiftletError) -> MachineRunReport {
        try await offCooperativePool(thread: "swiftlet-main") { () throws(SwiftletError) in try self.runBlocking(onBootMarker: onBootMarker) }
    }

    /// Boots the machine and blocks the calling thread until it stops.
    public func runBlocking(onBootMarker: (@Sendable (UInt64) -> Void)? = nil) throws(SwiftletError) -> MachineRunReport {
        try config.validate()
        var phases: [(name: String, end: UInt64)] = [("start", MonotonicClock.now)]
        let kvm = try KVMSystem(path: config.kvmPath)
        try kvm.require([
            (KVM_CAP_IRQCHIP, "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)"),
            (KVM_CAP_USER_MEMORY, "user memory regions (KVM_CAP_USER_MEMORY)"),
            (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        ])
        let hostMemory = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        try config.validate(maxVCPUs: min(kvm.maxVCPUs, MachineConfig.maximumCPUs), hostMemoryBytes: hostMemory)

        phases.append(("kvm", MonotonicClock.now))
        let vm = try kvm.createVirtualMachine()
        try vm.setTSSAddress(X86Layout.vmxTSS)
        try? vm.setIdentityMapAddress(X86Layout.vmxIdentityMap) // Intel only; harmless to skip elsewhere
        try vm.createInterruptController()

        phases.append(("vm", MonotonicClock.now))
        let ramRanges = X86Layout.ramRanges(bytes: UInt64(config.memoryMiB) << 20)
        let memory: GuestMemory
        if let restore { memory = try restore.mapMemory(expecting: ramRanges) } else { memory = try GuestMemory(anonymous: ramRanges) }
        var workingSet: [Range<Int>] = []
        if let restore, restore.prefetchesWorkingSet, let set = restore.recordedWorkingSet(pageCount: memory.pageCount) {
            workingSetLoaded.withLock { $0 = true }
            workingSet = set.runs
        }
        var prefetch: OSThread?
        defer { prefetch?.join() }
        // A restored machine logs dirty pages from the start (unless told not to): its next
        // snapshot can be a diff.
        let diffable = restore?.diffable ?? false
        for (slot, region) in memory.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.start.rawValue, size: region.size, host: region.hostAddress,
                                   logDirtyPages: diffable)
        }

        phases.append(("memory", MonotonicClock.now))
        let controller = try MachineController()
        running.withLock { $0 = controller }
        defer { running.withLock { $0 = nil } }
        if stopRequested.load(ordering: .acquiring) { controller.stop(.stopped) }
        let (disks, diskSizes) = try Self.makeDisks(config.disks, controller: controller)
        var virtioDevices: [any VirtioDevice] = disks
        if config.entropyDevice { virtioDevices.append(VirtioRNG(onError: { controller.warn($0.description) })) }
        var vsock: VirtioVsock?
        if let vsockConfig = config.vsock {
            let ports = ChainedPorts(first: vsockPorts, then: UnixSocketPorts(forwards: vsockConfig.forwards))
            let device = try VirtioVsock(guestCID: vsockConfig.guestCID, hostPorts: ports,
                                         onError: { controller.warn($0.description) })
            virtioDevices.append(device)
            vsock = device
        }
        defer { vsock?.stop() }
        var acpi = ACPIConfiguration(cpuCount: config.cpuCount, sleepControlPort: Ports.sleepControl, pvpanicPort: Ports.pvpanic)
        acpi.virtioDevices = virtioDevices.indices.map { Self.virtioSlot($0) }
        var plan: LinuxBootPlan?
        if restore == nil {
            let loaded = try LinuxBootLoader.prepare(
                LinuxBootConfiguration(kernelPath: config.kernelPath, initrdPath: config.initrdPath,
                                       commandLine: config.commandLine, acpi: acpi),
                memory: memory)
            if KVMBackend.detect() == .pvm && loaded.kernel.isLinux && !config.allowPVM {
                throw SwiftletError(.unsupported, Self.pvmMessage(kvmPath: config.kvmPath))
            }
            plan = loaded
        } else if let restore, restore.snapshot.guestIsLinux, KVMBackend.detect() == .pvm, !config.allowPVM {
            throw SwiftletError(.unsupported, Self.pvmMessage(kvmPath: config.kvmPath))
        }

        phases.append(("load", MonotonicClock.now))
        let console = ConsoleOutput(fd: config.consoleOutput)
        var devices = Self.makeBus(vm: vm, console: console, controller: controller, onBootMarker: onBootMarker)
        var transports: [VirtioMMIOTransport] = []
        for (index, device) in virtioDevices.enumerated() {
            let slot = Self.virtioSlot(index)
            let line = Self.interruptLine(vm: vm, gsi: slot.gsi, controller: controller)
            let transport = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: line),
                                                onError: { controller.warn($0.description) })
            devices.mmio.register(transport, base: slot.base, length: slot.size)
            transports.append(transport)
        }
        let bus = devices

        let supported = try kvm.supportedCPUID()
        let msrList = try kvm.msrIndexList()
        let msrs = Set(msrList)
        let tscDeadline = kvm.capability(KVM_CAP_TSC_DEADLINE_TIMER) > 0
        var vcpus: [VCPU] = []
        var cpuids: [[CPUIDEntry]] = []
        if let restore { try restore.checkCPU(supported: supported) }
        // The guest's clock moves on by the time since the snapshot (restoreState below, with
        // advanceClock); its TSCs move on by as much, so its timers agree with its clock.
        let sinceSnapshot = restore.map { VirtualMachine.timeSinceSave($0.snapshot.vm) } ?? 0
        for id in 0..<UInt32(config.cpuCount) {
            let vcpu = try vm.createVCPU(id: id)
            if let restore {
                let cpuid = restore.snapshot.cpuid[Int(id)]
                try vcpu.setCPUID(cpuid)
                try vcpu.restoreState(restore.snapshot.vcpus[Int(id)], advancingTSCBy: sinceSnapshot)
                cpuids.append(cpuid)
            } else {
                let cpuid = CPUIDSetup.entries(from: supported, cpu: id, count: config.cpuCount, tscDeadline: tscDeadline)
                try VCPUBootSetup.configure(vcpu, cpuid: cpuid, supportedMSRs: msrs, boot: id == 0 ? plan?.cpu : nil)
                cpuids.append(cpuid)
            }
            vcpus.append(vcpu)
            controller.attach(vcpu, thread: nil)
        }
        if let restore {
            try vm.restoreState(restore.snapshot.vm, advanceClock: true)
            bus.serial.restore(restore.snapshot.serial)
            for (transport, state) in zip(transports, restore.snapshot.devices) { try transport.restoreState(state) }
            if diffable { memory.startTrackingWrites() }
        }
        live.withLock {
            $0 = LiveMachine(vm: vm, vcpus: vcpus, memory: memory, serial: bus.serial, transports: transports, controller: controller,
                             cpuid: cpuids, msrIndices: msrList, hasXSave: kvm.capability(KVM_CAP_XSAVE) > 0,
                             hardware: SnapshotHardware(config, diskSizes: diskSizes),
                             guestIsLinux: restore?.snapshot.guestIsLinux ?? plan?.kernel.isLinux ?? false,
                             dirtyLogging: diffable, lastSnapshot: diffable ? restore.map { ($0.snapshot.id, $0.directory) } : nil)
        }
        defer { live.withLock { $0 = nil } }

        phases.append(("vcpus", MonotonicClock.now))
        let tracePorts = getenv("SWIFTLET_TRACE_IO") != nil
        let traces = Mutex<[UInt16: Int]>([:])
        let firstRun = MonotonicClock.now
        var threads: [OSThread] = []
        for vcpu in vcpus {
            let thread = try OSThread.start(name: "vcpu\(vcpu.id)") {
                let trace = VCPURunner(vcpu: vcpu, bus: bus, memory: memory, controller: controller, tracePorts: tracePorts).run()
                if tracePorts { traces.withLock { t in t.merge(trace) { $0 + $1 } } }
            }
            controller.setThread(thread, for: vcpu)
            threads.append(thread)
        }
        // A stop requested before a thread was registered must still reach it.
        if controller.isStopping { for (vcpu, thread) in zip(vcpus, threads) { vcpu.requestExit(); thread.interrupt() } }
        // The recorded working set is copied in once the guest runs, on a thread of its own (a
        // page the guest writes first it copies itself, as it would without the set). Even on the
        // one-CPU nested host this ends the first command as soon as copying it all before the
        // first KVM_RUN does, and the guest runs sooner; with CPUs to spare the two overlap.
        if !workingSet.isEmpty {
            prefetch = try? OSThread.start(name: "prefetch", stackSize: 64 << 10) { [workingSet] in memory.populateForWriting(workingSet) }
            if prefetch == nil { memory.populateForWriting(workingSet) }
        }

        ConsoleIOLoop(console: console, input: config.consoleInput, serial: bus.serial, controller: controller).run()
        for thread in threads { thread.join() }
        controller.detachAll()
        console.flush()

        return MachineRunReport(
            exit: controller.exit ?? .vmmError("the machine stopped without a reason"),
            processStart: MonotonicClock.processStart, firstRun: firstRun, bootMarker: controller.markerTime,
            end: MonotonicClock.now, exitsToUserspace: vcpus.reduce(0) { $0 + $1.exitCount },
            guestMemoryResidentBytes: memory.residentBytes, peakResidentBytes: Self.peakResidentBytes(),
            portTrace: traces.withLock { $0 }, phases: phases, warnings: controller.warnings)
    }

    static func pvmMessage(kvmPath: String) -> String {
        "\(kvmPath) on this host is backed by PVM (software virtualization, module kvm_pvm), which cannot boot an unmodified Linux kernel: it would run instruction-emulated for many seconds and then fail. Use a host with hardware KVM (Intel VT-x or AMD-V), boot a PVM-enabled guest kernel with --allow-pvm, or run Swiftlet inside the nested test host (scripts/nested-run)."
    }

    /// The VMM's devices on their ports and addresses.
    struct Bus: Sendable {
        var ports: PortIOBus
        var mmio = MMIOBus()
        let serial: Serial8250
    }

    /// Where virtio device `index` lives: its register window and its GSI.
    static func virtioSlot(_ index: Int) -> VirtioMMIODescription {
        VirtioMMIODescription(base: X86Layout.virtioMMIOBase + UInt64(index) * VirtioMMIOTransport.windowSize,
                              size: VirtioMMIOTransport.windowSize, gsi: firstVirtioGSI + UInt32(index))
    }

    /// Opens the disk images; a missing or unreadable one fails before the guest is loaded.
    /// Returns the devices and the images' sizes in bytes.
    static func makeDisks(_ disks: [DiskConfig], controller: MachineController) throws(SwiftletError) -> ([VirtioBlock], [UInt64]) {
        var devices: [VirtioBlock] = []
        var sizes: [UInt64] = []
        for (index, disk) in disks.enumerated() {
            let backend = try openDisk(disk)
            sizes.append(backend.byteCount)
            devices.append(VirtioBlock(backend: backend, readOnly: disk.readOnly, identifier: "swiftlet-disk\(index)",
                                       onError: { controller.warn($0.description) }))
        }
        return (devices, sizes)
    }

    /// The backend of one disk: its image file, a copy-on-write overlay over its base, or nothing
    /// (an empty drive).
    static func openDisk(_ disk: DiskConfig) throws(SwiftletError) -> any BlockBackend {
        if disk.isEmpty { return EmptyBlockBackend() }
        if let base = disk.base, disk.path.isEmpty {
            let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
            let overlay = try OwnedFileDescriptor.unlinkedTemporaryFile(in: directory, prefix: "swiftlet-overlay")
            return try CopyOnWriteBlockBackend(base: base, overlay: overlay, named: "a temporary overlay in \(directory)")
        }
        if let base = disk.base { return try CopyOnWriteBlockBackend(base: base, overlay: disk.path) }
        return try FileBlockBackend(path: disk.path, readOnly: disk.readOnly)
    }

    /// A guest interrupt line driven through KVM_IRQ_LINE on the in-kernel IOAPIC.
    static func interruptLine(vm: VirtualMachine, gsi: UInt32, controller: MachineController) -> KVMInterruptLine {
        KVMInterruptLine { level in
            do { try vm.setInterruptLine(gsi, level: level) } catch {
                controller.stop(.vmmError("cannot drive interrupt line \(gsi): \(error)"))
            }
        }
    }

    static func makeBus(vm: VirtualMachine, console: ConsoleOutput, controller: MachineController,
                        onBootMarker: (@Sendable (UInt64) -> Void)?) -> Bus {
        var ports = PortIOBus()
        let serial = Serial8250(output: console, interrupt: interruptLine(vm: vm, gsi: serialIRQ, controller: controller))
        ports.register(serial, base: Ports.serial, length: 8)
        ports.register(I8042 { controller.stop(.reset) }, base: Ports.i8042, length: 5)
        ports.register(BootMarker { time in
            controller.recordMarker(time)
            onBootMarker?(time)
        }, base: Ports.bootMarker, length: 1)
        ports.register(PVPanic { events in
            if events & PVPanic.panicked != 0 { controller.stop(.guestPanic) }
        }, base: Ports.pvpanic, length: 1)
        ports.register(ACPISleepControl(softOffType: ACPIConfiguration.softOffSleepType) { controller.stop(.powerOff) },
                       base: Ports.sleepControl, length: 1)
        return Bus(ports: ports, serial: serial)
    }

    /// VmHWM from /proc/self/status.
    static func peakResidentBytes() -> Int {
        guard let text = try? OwnedFileDescriptor.readSmallTextFile("/proc/self/status") else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let kib = line.split(separator: " ").compactMap { Int($0) }.first ?? 0
            return kib * 1024
        }
        return 0
    }
}
