import Hypervisor
import Synchronization
import SwiftletSystem

/// A hypervisor in the test process (no /dev/kvm): it takes memory slots and vCPU state and keeps
/// them, runs no guest code, and its vCPU 0 returns a scripted sequence of exits. A `Machine` built
/// on it goes through the whole VMM (assembly, kernel loading, boot setup, the vCPU loop, the
/// devices, the console) with only the guest's execution made up.
final class FakeHypervisor: Hypervisor {
    /// One scripted exit of vCPU 0.
    enum Exit: Sendable {
        /// The guest writes `byte` to I/O port `port`.
        case portWrite(port: UInt16, byte: UInt8)
        /// A system event of `type` (`VCPUExit.systemEventShutdown` and so on).
        case systemEvent(type: UInt32)
    }

    let features: Set<HypervisorFeature>
    let script: [Exit]
    /// The VMs created, in order.
    let machines = Mutex<[FakeVM]>([])

    init(features: Set<HypervisorFeature> = Set(HypervisorFeature.allCases), script: [Exit]) {
        self.features = features
        self.script = script
    }

    func supports(_ feature: HypervisorFeature) -> Bool { features.contains(feature) }

    func require(_ features: [HypervisorFeature]) throws(SwiftletError) {
        try requireSupport(features, of: "the fake hypervisor")
    }

    var maxVCPUs: Int { 4 }
    var requiresParavirtualizedGuest: Bool { false }

    func supportedCPUID() throws(SwiftletError) -> [CPUIDEntry] {
        [CPUIDEntry(function: 0, eax: 1), CPUIDEntry(function: 1, ecx: 1 << 0, edx: 1 << 0)]
    }

    func msrIndexList() throws(SwiftletError) -> [UInt32] { [0x10] }

    func createVirtualMachine() throws(SwiftletError) -> FakeVM {
        let vm = FakeVM(script: script)
        machines.withLock { $0.append(vm) }
        return vm
    }
}

final class FakeVM: HypervisorVM {
    struct State {
        /// Slot → (guest address, size, logs dirty pages).
        var slots: [UInt32: (address: UInt64, size: UInt64, logDirtyPages: Bool)] = [:]
        var hasInterruptController = false
        var lines: [UInt32: Bool] = [:]
        var vcpus: [FakeVCPU] = []
    }
    let state = Mutex(State())
    let script: [FakeHypervisor.Exit]

    init(script: [FakeHypervisor.Exit]) { self.script = script }

    func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer,
                         logDirtyPages: Bool, readOnly: Bool) throws(SwiftletError) {
        state.withLock { $0.slots[slot] = (guestAddress, size, logDirtyPages) }
    }

    func dirtyPages(slot: UInt32, pageCount: Int) throws(SwiftletError) -> [UInt64] {
        [UInt64](repeating: 0, count: (pageCount + 63) / 64)
    }

    func setTSSAddress(_ address: UInt64) throws(SwiftletError) {}
    func setIdentityMapAddress(_ address: UInt64) throws(SwiftletError) {}
    func createInterruptController() throws(SwiftletError) { state.withLock { $0.hasInterruptController = true } }
    func setInterruptLine(_ irq: UInt32, level: Bool) throws(SwiftletError) { state.withLock { $0.lines[irq] = level } }

    func saveState(hasPIT: Bool) throws(SwiftletError) -> VMState {
        VMState(interruptControllers: [[0], [1], [2]], pit: nil, clock: 0, clockRealtime: nil)
    }

    func restoreState(_ state: VMState, advanceClock: Bool) throws(SwiftletError) {}
    func timeSinceSave(_ state: VMState) -> UInt64 { 0 }

    func createVCPU(id: UInt32) throws(SwiftletError) -> FakeVCPU {
        let vcpu = FakeVCPU(id: id, script: id == 0 ? script : [])
        state.withLock { $0.vcpus.append(vcpu) }
        return vcpu
    }
}

final class FakeVCPU: HypervisorVCPU, @unchecked Sendable {
    // SAFETY (Sendable): `ioData` is written and handed out by `run()` on the vCPU's own thread
    // only (as KVM's run page is); everything else is behind the mutex or atomic.
    struct State {
        var registers = Registers()
        var specialRegisters = SpecialRegisters()
        var fpu = FPUState()
        var cpuid: [CPUIDEntry] = []
        var msrs: [UInt32: UInt64] = [:]
        var localAPIC = [UInt8](repeating: 0, count: 1024)
        var mpState = MPState.runnable
        var tscKHz: UInt64 = 2_000_000
        var exitCount: UInt64 = 0
        var next = 0
    }
    let id: UInt32
    let script: [FakeHypervisor.Exit]
    let state = Mutex(State())
    private let exitFlag = Atomic<Bool>(false)
    private let ioData = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)

    init(id: UInt32, script: [FakeHypervisor.Exit]) {
        self.id = id
        self.script = script
    }

    deinit { ioData.deallocate() }

    var exitCount: UInt64 { state.withLock { $0.exitCount } }

    func run() throws(SwiftletError) -> VCPUExit {
        let requested = exitFlag.load(ordering: .acquiring)
        let step = state.withLock { s -> FakeHypervisor.Exit? in
            s.exitCount += 1
            guard !requested, s.next < script.count else { return nil }
            defer { s.next += 1 }
            return script[s.next]
        }
        if requested { return .interrupted }
        switch step {
        case .portWrite(let port, let byte)?:
            ioData[0] = byte
            return .io(PortIO(port: port, size: 1, count: 1, isWrite: true, data: UnsafeMutableRawBufferPointer(rebasing: ioData[0..<1])))
        case .systemEvent(let type)?:
            return .systemEvent(type: type)
        case nil:
            throw SwiftletError(.invalidArgument, "fake vCPU \(id) ran past the end of its script")
        }
    }

    func requestExit() { exitFlag.store(true, ordering: .releasing) }
    func clearExitRequest() { exitFlag.store(false, ordering: .releasing) }
    var exitRequested: Bool { exitFlag.load(ordering: .acquiring) }
    @discardableResult func notifyClockPaused() -> Bool { false }

    func registers() throws(SwiftletError) -> Registers { state.withLock { $0.registers } }
    func setRegisters(_ registers: Registers) throws(SwiftletError) { state.withLock { $0.registers = registers } }
    func specialRegisters() throws(SwiftletError) -> SpecialRegisters { state.withLock { $0.specialRegisters } }
    func setSpecialRegisters(_ registers: SpecialRegisters) throws(SwiftletError) { state.withLock { $0.specialRegisters = registers } }
    func fpu() throws(SwiftletError) -> FPUState { state.withLock { $0.fpu } }
    func setFPU(_ fpu: FPUState) throws(SwiftletError) { state.withLock { $0.fpu = fpu } }
    func setCPUID(_ entries: [CPUIDEntry]) throws(SwiftletError) { state.withLock { $0.cpuid = entries } }
    func tscKHz() throws(SwiftletError) -> UInt64 { state.withLock { $0.tscKHz } }
    func setTSCKHz(_ khz: UInt64) throws(SwiftletError) { state.withLock { $0.tscKHz = khz } }

    func msrs(_ indices: [UInt32]) throws(SwiftletError) -> [MSREntry] {
        state.withLock { s in indices.compactMap { i in s.msrs[i].map { MSREntry(index: i, value: $0) } } }
    }

    func setMSRs(_ entries: [MSREntry]) throws(SwiftletError) {
        state.withLock { s in for e in entries { s.msrs[e.index] = e.value } }
    }

    func localAPIC() throws(SwiftletError) -> [UInt8] { state.withLock { $0.localAPIC } }
    func setLocalAPIC(_ registers: [UInt8]) throws(SwiftletError) { state.withLock { $0.localAPIC = registers } }
    func mpState() throws(SwiftletError) -> MPState { state.withLock { $0.mpState } }
    func setMPState(_ mp: MPState) throws(SwiftletError) { state.withLock { $0.mpState = mp } }
    func translate(_ virtualAddress: UInt64) throws(SwiftletError) -> UInt64? { virtualAddress }

    func saveState(msrIndices: [UInt32], hasXSave: Bool) throws(SwiftletError) -> VCPUState {
        let s = state.withLock { $0 }
        return VCPUState(id: id, registers: s.registers, specialRegisters: s.specialRegisters, fpu: s.fpu, xsave: nil, xcrs: nil,
                         msrs: try msrs(msrIndices), localAPIC: s.localAPIC, mpState: s.mpState, events: [], debugRegisters: [])
    }

    func restoreState(_ saved: VCPUState, advancingTSCBy nanoseconds: UInt64) throws(SwiftletError) {
        state.withLock { s in
            s.registers = saved.registers
            s.specialRegisters = saved.specialRegisters
            s.fpu = saved.fpu
            s.localAPIC = saved.localAPIC
            s.mpState = saved.mpState
            for e in saved.msrs { s.msrs[e.index] = e.value }
        }
    }
}
