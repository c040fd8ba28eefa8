import SwiftletSystem

// The seam between the VMM and a hypervisor: what the VMM asks of one, and nothing more. The
// KVM target implements it over ioctls; another backend (or a test double) is a target of its
// own. Only a backend issues system calls to its hypervisor: the VMM and the devices see these
// protocols and the plain values of this target.
//
// The protocols have associated types so that a backend's vCPU type is known where it matters:
// the VMM's vCPU loop is generic over `HypervisorVCPU` and is specialized for the default
// backend's vCPU (no dynamic dispatch per exit). Setup, pause and snapshot go through `any`
// existentials, which costs nothing that matters there.

/// What a hypervisor may or may not offer, which the VMM asks about before relying on it.
public enum HypervisorFeature: Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// In-kernel interrupt controllers: the PIC, the IOAPIC and a local APIC per vCPU.
    case interruptController
    /// Guest memory given as host memory in numbered slots.
    case userMemory
    /// Setting the full CPUID (extended leaves included) a vCPU shows its guest.
    case extendedCPUID
    /// A vCPU's run returns at once when another thread has requested an exit (`requestExit()`).
    case immediateExit
    /// The local APIC's TSC-deadline timer mode.
    case tscDeadlineTimer
    /// Saving and restoring the full XSAVE state (AVX and later registers) of a vCPU.
    case xsave
    /// Running a vCPU's TSC at another frequency than the host's (`setTSCKHz`).
    case tscScaling

    public var description: String {
        switch self {
        case .interruptController: return "an in-kernel interrupt controller"
        case .userMemory: return "user memory regions"
        case .extendedCPUID: return "extended CPUID setting"
        case .immediateExit: return "immediate vCPU exits"
        case .tscDeadlineTimer: return "the TSC-deadline timer"
        case .xsave: return "XSAVE state"
        case .tscScaling: return "TSC scaling"
        }
    }
}

/// A hypervisor opened for use: what it supports, and the maker of virtual machines.
public protocol Hypervisor: Sendable {
    associatedtype VM: HypervisorVM

    /// Whether `feature` is available.
    func supports(_ feature: HypervisorFeature) -> Bool
    /// Fails with a clear message (naming what is missing, in the backend's terms) unless every
    /// feature of `features` is available.
    func require(_ features: [HypervisorFeature]) throws(SwiftletError)
    /// The most vCPUs one VM may have.
    var maxVCPUs: Int { get }
    /// Whether only guest kernels built for this hypervisor run usably: true for PVM (KVM in
    /// software), where an unmodified Linux kernel runs instruction-emulated and fails.
    var requiresParavirtualizedGuest: Bool { get }
    /// The CPUID leaves the hypervisor can offer guests on this host.
    func supportedCPUID() throws(SwiftletError) -> [CPUIDEntry]
    /// The MSR indices the hypervisor saves and restores for a vCPU.
    func msrIndexList() throws(SwiftletError) -> [UInt32]
    /// Creates a virtual machine with no memory and no vCPUs.
    func createVirtualMachine() throws(SwiftletError) -> VM
}

extension Hypervisor {
    /// Fails unless every feature of `features` is available, naming the first that is not.
    public func requireSupport(_ features: [HypervisorFeature], of name: String) throws(SwiftletError) {
        for feature in features where !supports(feature) {
            throw SwiftletError(.unsupported, "\(name) lacks \(feature), which Swiftlet needs")
        }
    }
}

/// A virtual machine: its memory slots, its interrupt controllers and clock, and its vCPUs.
/// Shared by the VMM's threads (devices raise interrupts from theirs).
public protocol HypervisorVM: Sendable {
    associatedtype VCPU: HypervisorVCPU

    /// Places `size` bytes of host memory at `guestAddress` in memory slot `slot` (replacing what
    /// the slot held). With `logDirtyPages` the hypervisor logs the pages the guest writes there
    /// (`dirtyPages(slot:pageCount:)`); with `readOnly` guest writes exit as MMIO.
    func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer,
                         logDirtyPages: Bool, readOnly: Bool) throws(SwiftletError)
    /// The pages of memory slot `slot` (of `pageCount` 4 KiB pages) written since the last call, as
    /// a bitmap (bit i of word i/64 = page i), and clears the log. The slot must log dirty pages.
    func dirtyPages(slot: UInt32, pageCount: Int) throws(SwiftletError) -> [UInt64]

    /// x86 (Intel VMX): where the hypervisor keeps its real-mode TSS (three pages), outside guest RAM.
    func setTSSAddress(_ address: UInt64) throws(SwiftletError)
    /// x86 (Intel VMX): where the hypervisor keeps its real-mode identity page table (one page),
    /// outside guest RAM. May fail where it does not apply (AMD).
    func setIdentityMapAddress(_ address: UInt64) throws(SwiftletError)
    /// Creates the in-kernel PIC, IOAPIC and per-vCPU local APICs.
    func createInterruptController() throws(SwiftletError)
    /// Drives interrupt line `irq` (a GSI) of the interrupt controller to `level`.
    func setInterruptLine(_ irq: UInt32, level: Bool) throws(SwiftletError)

    /// Reads the interrupt controllers, the PIT (if `hasPIT`) and the clock. The vCPUs must not be running.
    func saveState(hasPIT: Bool) throws(SwiftletError) -> VMState
    /// Puts back a state saved by `saveState`, before any vCPU runs. With `advanceClock`, the guest's
    /// clock moves on by the host wall-clock time since the save (`timeSinceSave`).
    func restoreState(_ state: VMState, advanceClock: Bool) throws(SwiftletError)
    /// How far (ns) `restoreState(_:advanceClock: true)` moves the guest's clock on for `state`:
    /// what the vCPUs' time-stamp counters must move on by too. Zero if unknown.
    func timeSinceSave(_ state: VMState) -> UInt64

    /// Creates vCPU `id` (its initial APIC ID).
    func createVCPU(id: UInt32) throws(SwiftletError) -> VCPU
}

/// One virtual CPU. It belongs to one thread, which calls `run()` in a loop and may use every
/// other method; other threads may only call `requestExit()`, or anything while that thread is
/// parked outside `run()`.
public protocol HypervisorVCPU: AnyObject, Sendable {
    var id: UInt32 { get }
    /// Exits to the VMM (returns from `run()`) so far.
    var exitCount: UInt64 { get }

    /// Runs the vCPU until the guest needs the VMM.
    func run() throws(SwiftletError) -> VCPUExit
    /// Makes `run()` return `.interrupted` now (with the thread's wakeup signal, if it is
    /// running) or on its next call. Safe from any thread.
    func requestExit()
    /// Clears a pending `requestExit`.
    func clearExitRequest()
    /// Whether an exit has been requested and not cleared.
    var exitRequested: Bool { get }
    /// Tells the guest's paravirtual clock that the vCPU was stopped for a while (so its
    /// soft-lockup watchdog does not fire after a pause). False when the guest does not use one.
    @discardableResult
    func notifyClockPaused() -> Bool

    func registers() throws(SwiftletError) -> Registers
    func setRegisters(_ registers: Registers) throws(SwiftletError)
    func specialRegisters() throws(SwiftletError) -> SpecialRegisters
    func setSpecialRegisters(_ registers: SpecialRegisters) throws(SwiftletError)
    func fpu() throws(SwiftletError) -> FPUState
    func setFPU(_ state: FPUState) throws(SwiftletError)
    /// Sets the CPUID leaves the guest sees on this vCPU.
    func setCPUID(_ entries: [CPUIDEntry]) throws(SwiftletError)
    /// The frequency of the guest's TSC on this vCPU, in kHz.
    func tscKHz() throws(SwiftletError) -> UInt64
    /// Runs the guest's TSC on this vCPU at `khz` (needs `.tscScaling` unless it is the host's).
    func setTSCKHz(_ khz: UInt64) throws(SwiftletError)
    /// Reads `indices`; returns the MSRs that could be read (up to the first that could not).
    func msrs(_ indices: [UInt32]) throws(SwiftletError) -> [MSREntry]
    /// Writes `entries`, failing unless every one was accepted.
    func setMSRs(_ entries: [MSREntry]) throws(SwiftletError)
    /// The local APIC's 1 KiB register page.
    func localAPIC() throws(SwiftletError) -> [UInt8]
    func setLocalAPIC(_ registers: [UInt8]) throws(SwiftletError)
    func mpState() throws(SwiftletError) -> MPState
    func setMPState(_ state: MPState) throws(SwiftletError)
    /// Guest-virtual to guest-physical translation through the vCPU's current page tables.
    func translate(_ virtualAddress: UInt64) throws(SwiftletError) -> UInt64?

    /// Captures the vCPU's whole state; the vCPU must not be running. `msrIndices` is usually
    /// the hypervisor's `msrIndexList()`; `hasXSave` whether it supports `.xsave`.
    func saveState(msrIndices: [UInt32], hasXSave: Bool) throws(SwiftletError) -> VCPUState
    /// Puts back a state saved by `saveState`; CPUID must already be set. `advancingTSCBy`
    /// nanoseconds moves the time-stamp counter on by that long at the guest's frequency (a
    /// restore that advances the VM's clock passes the VM's `timeSinceSave`).
    func restoreState(_ state: VCPUState, advancingTSCBy nanoseconds: UInt64) throws(SwiftletError)
}
