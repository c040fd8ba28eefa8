import SwiftletSystem

// The state a hypervisor keeps for a vCPU and for a VM, as plain values: what a snapshot stores
// and a restore sets. Their Codable encodings are the snapshot state file's format
// (docs/snapshot-format.md): property names and order must not change. This file imports
// SwiftletSystem for the hexadecimal byte wrappers and their container overloads, which the
// synthesized conformances use.

/// Everything KVM holds about one vCPU, as plain values: what a snapshot stores and a restore sets.
public struct VCPUState: Codable, Sendable, Equatable {
    public var id: UInt32
    public var registers: Registers
    public var specialRegisters: SpecialRegisters
    public var fpu: FPUState
    /// `struct kvm_xsave` (the full XSAVE area: x87, SSE, AVX, ...), when the host supports XSAVE.
    @OptionalHexBytes public var xsave: [UInt8]?
    /// `struct kvm_xcrs` (XCR0), when the host supports it.
    @OptionalHexBytes public var xcrs: [UInt8]?
    public var msrs: [MSREntry]
    @HexBytes public var localAPIC: [UInt8]
    public var mpState: MPState
    /// `struct kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMM state.
    @HexBytes public var events: [UInt8]
    /// `struct kvm_debugregs`.
    @HexBytes public var debugRegisters: [UInt8]

    public init(id: UInt32, registers: Registers, specialRegisters: SpecialRegisters, fpu: FPUState,
                xsave: [UInt8]?, xcrs: [UInt8]?, msrs: [MSREntry], localAPIC: [UInt8], mpState: MPState,
                events: [UInt8], debugRegisters: [UInt8]) {
        self.id = id
        self.registers = registers
        self.specialRegisters = specialRegisters
        self.fpu = fpu
        self.xsave = xsave
        self.xcrs = xcrs
        self.msrs = msrs
        self.localAPIC = localAPIC
        self.mpState = mpState
        self.events = events
        self.debugRegisters = debugRegisters
    }
}

/// The VM-wide state KVM keeps (interrupt controllers, PIT, clock), as plain values for snapshots.
/// The byte arrays are KVM's own structs, which are part of its stable ABI on one architecture.
public struct VMState: Codable, Sendable, Equatable {
    /// `struct kvm_irqchip` for the master PIC, the slave PIC and the IOAPIC (chip ids 0, 1, 2).
    @HexByteList public var interruptControllers: [[UInt8]]
    /// `struct kvm_pit_state2`, when the VM has an in-kernel PIT.
    @OptionalHexBytes public var pit: [UInt8]?
    /// The guest's kvmclock (ns) when saved, and the host's CLOCK_REALTIME (ns) at that moment
    /// when KVM reports it (`KVM_CLOCK_REALTIME`), so a restore can account for the time in between.
    public var clock: UInt64
    public var clockRealtime: UInt64?

    public init(interruptControllers: [[UInt8]], pit: [UInt8]?, clock: UInt64, clockRealtime: UInt64?) {
        self.interruptControllers = interruptControllers
        self.pit = pit
        self.clock = clock
        self.clockRealtime = clockRealtime
    }
}
