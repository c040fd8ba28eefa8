import CLinux
import Devices
import Glibc
import GuestMemory
import Hypervisor
import MachineState
import Synchronization
import SwiftletSystem

/// A virtual machine on a hypervisor (KVM unless given another, `HypervisorProvider`): booted from a Linux kernel (`init(config:)`) or restored from a
/// snapshot (`restoring(from:)`), it runs until the guest powers off, reboots or crashes, or it
/// is stopped. A running machine can be paused, snapshotted and forked.
///
/// ```swift
/// let machine = Machine(config: MachineConfig(kernelPath: "vmlinux", initrdPath: "initrd.cpio"))
/// let report = try await machine.run()
/// print(report.exit)
/// ```
///
/// Boot and restore are two builders (`buildForBoot`, `buildFromSnapshot`) over one assembly step
/// (`assemble`: hypervisor, memory, buses and devices); the run that follows is the same for both.
public final class Machine: Sendable {
    /// How the machine starts.
    enum Origin: Sendable {
        case boot(MachineConfig)
        case snapshot(RestorePlan)
    }
    let origin: Origin
    /// The machine's hardware and host resources, however it starts.
    public let shape: MachineShape
    /// Where guest vsock connections go before `shape.vsock`'s Unix socket forwards (an
    /// in-process agent channel, say).
    public let vsockPorts: (any VsockHostPorts)?
    /// Opens the hypervisor each run builds its machine on.
    let openHypervisor: HypervisorProvider
    /// The run in progress, for `stop()`.
    private let running = Mutex<MachineController?>(nil)
    private let stopRequested = Atomic<Bool>(false)
    /// The parts of a running machine that pause and snapshot work on.
    let live = Mutex<LiveMachine?>(nil)
    /// Held by pause, resume and snapshot, one at a time (a snapshot pauses and resumes itself).
    let operations = Mutex<Void>(())
    /// Whether the restore found the snapshot's working set (or this machine recorded it).
    let workingSetLoaded = Mutex<Bool>(false)
    /// A machine restored with lazy memory: what fills it (kept as long as the machine, whose
    /// memory it holds).
    let lazyMemory = Mutex<LazyMemory?>(nil)
    /// When each step of the latest build ended (CLOCK_MONOTONIC ns), set before
    /// `runBlocking`'s `beforeGuestRuns`: "start", "kvm", "vm", "memory", "load".
    private let buildStepsLock = Mutex<[(name: String, end: UInt64)]>([])
    package var buildSteps: [(name: String, end: UInt64)] { buildStepsLock.withLock { $0 } }
    /// The key its guest agent proves it holds on every session (`AgentKey`, `AgentSession.open`).
    let agentKey: Mutex<AgentKeyState>

    /// A machine that boots `config`. `hypervisor` opens what it runs on (KVM at `config.kvmPath`
    /// by default; a test double or another backend otherwise).
    public init(config: MachineConfig, vsockPorts: (any VsockHostPorts)? = nil,
                hypervisor: @escaping HypervisorProvider = Machine.defaultHypervisor) {
        self.origin = .boot(config)
        self.shape = config.shape
        self.vsockPorts = vsockPorts
        self.openHypervisor = hypervisor
        self.agentKey = Mutex(.toGive(nil))
    }

    init(restoring plan: RestorePlan, shape: MachineShape, vsockPorts: (any VsockHostPorts)?, hypervisor: @escaping HypervisorProvider) {
        self.origin = .snapshot(plan)
        self.shape = shape
        self.vsockPorts = vsockPorts
        self.openHypervisor = hypervisor
        self.agentKey = Mutex(plan.snapshot.agentKey.map { .held($0) } ?? .missing)
    }

    /// The configuration a booted machine boots; nil for a restored one.
    public var bootConfig: MachineConfig? {
        if case .boot(let config) = origin { return config }
        return nil
    }

    /// The snapshot a restored machine starts from.
    var restore: RestorePlan? {
        if case .snapshot(let plan) = origin { return plan }
        return nil
    }

    /// Stops the machine at once (its vCPUs leave the guest; no guest shutdown): the run ends
    /// with `.stopped`. Safe from any thread; a stop before the run starts ends it as soon as it does.
    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        running.withLock { $0?.stop(.stopped) }
    }

    /// Builds the machine and runs it until it stops, on a dedicated thread (never blocking Swift's
    /// cooperative pool). `onBootMarker` is called (on a vCPU thread) when the guest writes the marker.
    public func run(onBootMarker: (@Sendable (UInt64) -> Void)? = nil) async throws(SwiftletError) -> MachineRunReport {
        try await offCooperativePool(thread: "swiftlet-main") { () throws(SwiftletError) in try self.runBlocking(onBootMarker: onBootMarker) }
    }

    /// Builds the machine and blocks the calling thread until it stops. Machine's public API is
    /// the async one (`run`, `pause`, `resume`, `snapshot`, `fork`); these blocking forms are the
    /// package's own, for the use cases (SwiftletKit), which call them from threads of their own.
    /// `beforeGuestRuns` is called once the machine is built, on this thread, just before the
    /// vCPU threads start, with the size of the largest file the running machine may write (see
    /// `largestFileBytes`): where a VMM process confines itself (`Confinement`); its error ends the run.
    package func runBlocking(onBootMarker: (@Sendable (UInt64) -> Void)? = nil,
                             beforeGuestRuns: ((UInt64) throws(SwiftletError) -> Void)? = nil) throws(SwiftletError) -> MachineRunReport {
        var phases: [(name: String, end: UInt64)] = [("start", MonotonicClock.now)]
        let controller = try MachineController()
        running.withLock { $0 = controller }
        defer { running.withLock { $0 = nil } }
        if stopRequested.load(ordering: .acquiring) { controller.stop(.stopped) }
        let built: BuiltMachine
        switch origin {
        case .boot(let config):
            built = try buildForBoot(config, controller: controller, phases: &phases, onBootMarker: onBootMarker)
        case .snapshot(let plan):
            built = try buildFromSnapshot(plan, controller: controller, phases: &phases, onBootMarker: onBootMarker)
        }
        defer { built.parts.tearDown() }
        buildStepsLock.withLock { $0 = phases }
        // A machine that shares host directories writes the files its guest writes there: those
        // are as large as the guest makes them (a host directory's own disk bounds them).
        try beforeGuestRuns?(shape.volumes.isEmpty ? Self.largestFileBytes(memoryMiB: shape.memoryMiB, diskSizes: built.parts.diskSizes) : UInt64.max)
        return try run(built, controller: controller, phases: phases)
    }

    /// The largest file a running machine writes is a snapshot's memory file (its memory and a
    /// header) or the copy of a writable disk (its size; the disk itself never grows): a VMM
    /// process bounds the files it writes by the larger of the two, plus room for the memory file's
    /// header and a diff's page bitmap (32 MiB at 1 TiB) (`Confinement`'s file-size limit), so no bug can fill the host's disk through one file.
    static func largestFileBytes(memoryMiB: Int, diskSizes: [UInt64]) -> UInt64 {
        max(UInt64(memoryMiB) << 20, diskSizes.max() ?? 0) + (64 << 20)
    }

    /// The descriptors this machine's VMM process may hold: `Confinement.descriptorLimit`, and
    /// room for the files a guest holds open in its shared directories (each looked-up file and
    /// open handle is a descriptor).
    public var descriptorLimit: rlim_t {
        guard !shape.volumes.isEmpty else { return Confinement.descriptorLimit }
        let limits = FuseServer.Limits()
        return Confinement.descriptorLimit + rlim_t(limits.nodes + limits.handles)
    }

    /// Runs a built machine: its vCPU threads, the working-set copy beside them, and the console
    /// loop on this thread, until the machine stops.
    private func run(_ built: BuiltMachine, controller: MachineController,
                     phases: [(name: String, end: UInt64)]) throws(SwiftletError) -> MachineRunReport {
        var phases = phases
        let parts = built.parts, memory = parts.memory, devices = parts.devices
        for vcpu in built.vcpus { controller.attach(vcpu, thread: nil) }
        // A restored machine logs dirty pages from the start (unless told not to): its next
        // snapshot can be a diff.
        let diffable = restore?.diffable ?? false
        live.withLock {
            $0 = LiveMachine(vm: parts.vm, vcpus: built.vcpus, memory: memory, devices: devices, controller: controller,
                             cpuid: built.cpuid, msrIndices: parts.msrIndices, hasXSave: parts.hypervisor.supports(.xsave),
                             hardware: SnapshotHardware(shape, diskSizes: parts.diskSizes), guestIsLinux: built.guestIsLinux,
                             dirtyLogging: diffable, lastSnapshot: diffable ? restore.map { ($0.snapshot.id, $0.directory) } : nil)
        }
        defer { live.withLock { $0 = nil } }

        phases.append(("vcpus", MonotonicClock.now))
        let tracePorts = getenv("SWIFTLET_TRACE_IO") != nil
        let traces = Mutex<[UInt16: Int]>([:])
        let firstRun = MonotonicClock.now
        var threads: [OSThread] = []
        for vcpu in built.vcpus {
            let thread = try OSThread.start(name: "vcpu\(vcpu.id)") {
                // In a confined VMM process, the vCPU thread's own filter on top of the process's.
                do throws(SwiftletError) { try Confinement.confineVCPUThread() } catch {
                    controller.stop(.vmmError(error.description))
                    return
                }
                let trace = Self.runVCPU(vcpu, devices: devices, memory: memory, controller: controller, tracePorts: tracePorts)
                if tracePorts { traces.withLock { t in t.merge(trace) { $0 + $1 } } }
            }
            controller.setThread(thread, for: vcpu)
            threads.append(thread)
        }
        // A stop requested before a thread was registered must still reach it.
        if controller.isStopping { for (vcpu, thread) in zip(built.vcpus, threads) { vcpu.requestExit(); thread.interrupt() } }
        // The recorded working set is copied in once the guest runs, on a thread of its own (a
        // page the guest writes first it copies itself, as it would without the set). Even on the
        // one-CPU nested host this ends the first command as soon as copying it all before the
        // first KVM_RUN does, and the guest runs sooner; with CPUs to spare the two overlap.
        var prefetch: OSThread?
        defer { prefetch?.join() }
        if !built.prefetch.isEmpty {
            let pages = built.prefetch
            prefetch = try? OSThread.start(name: "prefetch", stackSize: 64 << 10) { memory.populateForWriting(pages) }
            if prefetch == nil { memory.populateForWriting(pages) }
        }

        ConsoleIOLoop(console: parts.console, input: shape.consoleInput, serial: devices.serial, controller: controller).run()
        devices.requestStop()
        for thread in threads { thread.join() }
        controller.detachAll()
        parts.console.flush()

        return MachineRunReport(
            exit: controller.exit ?? .vmmError("the machine stopped without a reason"),
            processStart: MonotonicClock.processStart, firstRun: firstRun, bootMarker: controller.markerTime,
            end: MonotonicClock.now, exitsToUserspace: built.vcpus.reduce(0) { $0 + $1.exitCount },
            guestMemoryResidentBytes: memory.residentBytes, peakResidentBytes: Self.peakResidentBytes(),
            portTrace: traces.withLock { $0 }, phases: phases, warnings: controller.warnings)
    }

    /// VmHWM from /proc/self/status.
    static func peakResidentBytes() -> Int { (ProcessMemory.statusKiB("VmHWM") ?? 0) * 1024 }
}
