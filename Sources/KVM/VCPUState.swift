import CLinux
import Hypervisor
import SwiftletSystem

extension VCPU {
    private func getBlob<T>(_ initial: T, _ name: String, _ request: UInt) throws(SwiftletError) -> [UInt8] {
        var value = initial
        try ioctl(name, request, &value)
        return withUnsafeBytes(of: value) { Array($0) }
    }

    private func setBlob<T>(_ initial: T, _ bytes: [UInt8], _ name: String, _ request: UInt) throws(SwiftletError) {
        var value = initial
        guard bytes.count == MemoryLayout<T>.size else {
            throw SwiftletError(.invalidFormat, "\(name): saved state is \(bytes.count) bytes, this host's KVM wants \(MemoryLayout<T>.size)")
        }
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
        try ioctl(name, request, &value)
    }

    /// Captures the vCPU's whole state. The vCPU must not be running (its thread is parked).
    /// `msrIndices` is usually `KVMSystem.msrIndexList()`.
    public func saveState(msrIndices: [UInt32], hasXSave: Bool) throws(SwiftletError) -> VCPUState {
        // The order matters: MP state and events before registers, as KVM may adjust them.
        let mp = try mpState()
        let events = try getBlob(kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS", SWIFTLET_KVM_GET_VCPU_EVENTS)
        return VCPUState(
            id: id,
            registers: try registers(),
            specialRegisters: try specialRegisters(),
            fpu: try fpu(),
            xsave: hasXSave ? try getBlob(kvm_xsave(), "KVM_GET_XSAVE", SWIFTLET_KVM_GET_XSAVE) : nil,
            xcrs: hasXSave ? try getBlob(kvm_xcrs(), "KVM_GET_XCRS", SWIFTLET_KVM_GET_XCRS) : nil,
            msrs: try readableMSRs(msrIndices),
            localAPIC: try localAPIC(),
            mpState: mp,
            events: events,
            debugRegisters: try getBlob(kvm_debugregs(), "KVM_GET_DEBUGREGS", SWIFTLET_KVM_GET_DEBUGREGS))
    }

    /// Reads every MSR of `indices` that KVM can read for this vCPU (some on the host's list are
    /// not available to a guest with this CPUID), skipping the rest.
    public func readableMSRs(_ indices: [UInt32]) throws(SwiftletError) -> [MSREntry] {
        var result: [MSREntry] = []
        var remaining = indices[...]
        while !remaining.isEmpty {
            let read = try msrs(Array(remaining))
            result += read
            remaining = remaining.dropFirst(read.count + 1) // KVM stopped at the one it could not read
        }
        return result
    }

    /// The time-stamp counter MSR, and the local APIC timer's TSC deadline.
    public static let tscMSR: UInt32 = 0x10
    public static let tscDeadlineMSR: UInt32 = 0x6E0

    /// Puts back a state saved by `saveState`. CPUID must already be set (KVM checks XSAVE and MSRs against it).
    ///
    /// The local APIC goes back before the MSRs: KVM drops a write of the TSC-deadline MSR unless
    /// the APIC's timer is already in TSC-deadline mode, and a guest idle until its next timer
    /// deadline would then never wake up.
    ///
    /// `advancingTSCBy` nanoseconds moves the guest's time-stamp counter on by that long at its own
    /// frequency: a restore that advances the guest's clock (`VirtualMachine.restoreState` with
    /// `advanceClock`) must advance the TSC as far, or the two disagree. A TSC-deadline timer the
    /// guest armed before the snapshot would then fire as late after the restore as it was due
    /// after the snapshot, while the guest's clock says it is long overdue: until it fires, the
    /// guest's timer code believes an earlier event is already programmed and arms nothing sooner
    /// (a 100 µs sleep right after a restore took 640 ms). Advanced, the deadline is in the past
    /// and fires at once, and the guest's timers catch up with its clock.
    public func restoreState(_ state: VCPUState, advancingTSCBy nanoseconds: UInt64 = 0) throws(SwiftletError) {
        try setSpecialRegisters(state.specialRegisters)
        try setRegisters(state.registers)
        if let xcrs = state.xcrs { try setBlob(kvm_xcrs(), xcrs, "KVM_SET_XCRS", SWIFTLET_KVM_SET_XCRS) }
        if let xsave = state.xsave {
            try setBlob(kvm_xsave(), xsave, "KVM_SET_XSAVE", SWIFTLET_KVM_SET_XSAVE)
        } else {
            try setFPU(state.fpu)
        }
        try setLocalAPIC(state.localAPIC)
        var msrs = state.msrs
        if nanoseconds > 0, let tsc = msrs.firstIndex(where: { $0.index == Self.tscMSR }) {
            let khz = try tscKHz()
            // kHz × ns / 10^6 = cycles; split so that hours of nanoseconds cannot overflow.
            let cycles = khz * (nanoseconds / 1_000_000) + khz * (nanoseconds % 1_000_000) / 1_000_000
            msrs[tsc].value &+= cycles
        }
        // The deadline goes last: KVM arms it against the TSC the vCPU has when it is written, and
        // does not re-arm it when the TSC is written after.
        let deadline = msrs.filter { $0.index == Self.tscDeadlineMSR }
        try setMSRs(msrs.filter { $0.index != Self.tscDeadlineMSR })
        if !deadline.isEmpty { try setMSRs(deadline) }
        try setBlob(kvm_debugregs(), state.debugRegisters, "KVM_SET_DEBUGREGS", SWIFTLET_KVM_SET_DEBUGREGS)
        try setMPState(state.mpState)
        try setBlob(kvm_vcpu_events(), state.events, "KVM_SET_VCPU_EVENTS", SWIFTLET_KVM_SET_VCPU_EVENTS)
    }
}
