import CLinux
import GuestMemory
import Hypervisor
import SwiftletSystem
import Testing
import TestSupport
@testable import KVM

@Suite(.enabled(if: TestHost.hasKVM, "needs /dev/kvm")) struct VCPUStateTests {
    /// A counter loop: OUT al to port 0x10, increment al, repeat.
    static let counter = Real.movDX(0x10) + Real.movAL(0) + Real.outDXAL + Real.incAL + [0xEB, 0xFB]

    @Test func savedStateContinuesExactlyInAnotherVM() throws {
        let original = try RealModeGuest(code: Self.counter, irqchip: true)
        for expected in 0..<5 {
            #expect(try original.nextOut()?.1 == UInt8(expected))
        }
        let kvm = original.system
        try original.completePendingAccess()
        let state = try original.vcpu.saveState(msrIndices: try kvm.msrIndexList(), hasXSave: kvm.capability(KVM_CAP_XSAVE) > 0)
        #expect(state.registers.rax & 0xFF == 4)
        #expect(state.localAPIC.count == 1024)

        // A new VM, a copy of the guest's memory, the saved vCPU state: the count goes on from 5.
        let copy = try GuestMemory(anonymous: [(GuestAddress(0), RealModeGuest.memorySize)])
        try copy.write(try original.memory.read(count: Int(RealModeGuest.memorySize), at: GuestAddress(0)), at: GuestAddress(0))
        let restored = try RealModeGuest(code: [], memory: copy, irqchip: true)
        try restored.vcpu.restoreState(state)
        for expected in 5..<10 {
            #expect(try restored.nextOut()?.1 == UInt8(expected))
        }
        // And the original is untouched by all this.
        #expect(try original.nextOut()?.1 == 5)
    }

    /// A guest waiting for a TSC-deadline timer must still have its deadline after a restore (KVM
    /// ignores the deadline MSR unless the local APIC's timer is in deadline mode when it is set).
    /// The counter guest with the TSC-deadline feature in its CPUID and its local APIC timer in
    /// deadline mode (KVM offers the mode only to a guest whose CPUID has it), after its first OUT.
    static func deadlineModeGuest() throws -> (guest: RealModeGuest, cpuid: [CPUIDEntry]) {
        let guest = try RealModeGuest(code: Self.counter, irqchip: true)
        let cpuid = try guest.system.supportedCPUID().map { entry in
            var e = entry
            if e.function == 1 { e.ecx |= 1 << 24 }
            return e
        }
        try guest.vcpu.setCPUID(cpuid)
        _ = try guest.nextOut()
        var apic = try guest.vcpu.localAPIC()
        let lvtTimer = 0x320, deadlineMode: UInt32 = 2 << 17, vector: UInt32 = 0xEC
        for i in 0..<4 { apic[lvtTimer + i] = UInt8(truncatingIfNeeded: (deadlineMode | vector) >> (8 * UInt32(i))) }
        try guest.vcpu.setLocalAPIC(apic)
        return (guest, cpuid)
    }

    @Test func aPendingTSCDeadlineSurvivesTheRestore() throws {
        let (original, cpuid) = try Self.deadlineModeGuest()
        let tscDeadlineMSR: UInt32 = 0x6E0
        let tsc = try original.vcpu.msrs([0x10])[0].value
        let deadline = tsc + 1 << 40 // far in the future: it must not fire and clear itself
        try original.vcpu.setMSRs([MSREntry(index: tscDeadlineMSR, value: deadline)])
        let kvm = original.system
        let state = try original.vcpu.saveState(msrIndices: try kvm.msrIndexList(), hasXSave: false)
        let saved = try #require(state.msrs.first { $0.index == tscDeadlineMSR }, "the deadline MSR is on KVM's save list")
        #expect(saved.value == deadline)

        let copy = try GuestMemory(anonymous: [(GuestAddress(0), RealModeGuest.memorySize)])
        try copy.write(try original.memory.read(count: Int(RealModeGuest.memorySize), at: GuestAddress(0)), at: GuestAddress(0))
        let restored = try RealModeGuest(code: [], memory: copy, irqchip: true)
        try restored.vcpu.setCPUID(cpuid)
        try restored.vcpu.restoreState(state)
        #expect(try restored.vcpu.msrs([tscDeadlineMSR])[0].value == deadline)
    }

    /// A restore that moves the guest's clock on by the time since the snapshot moves its TSC on
    /// as far: a deadline that was a second away when saved is then overdue (it fires as soon as
    /// the vCPU runs) instead of a second away again while the guest's clock says it is late.
    @Test(.enabled(if: Self.tscIsSettable, "this KVM does not let the VMM set a guest's TSC (PVM runs guest code on the host's)"))
    func aRestoreThatAdvancesTheClockAdvancesTheTSCAndPendingDeadlinesAreDue() throws {
        let (original, cpuid) = try Self.deadlineModeGuest()
        let khz = try original.vcpu.tscKHz()
        #expect(khz > 100_000, "a TSC of \(khz) kHz")
        let tsc = try original.vcpu.msrs([VCPU.tscMSR])[0].value
        try original.vcpu.setMSRs([MSREntry(index: VCPU.tscDeadlineMSR, value: tsc + khz * 1000)]) // one second ahead
        let state = try original.vcpu.saveState(msrIndices: try original.system.msrIndexList(), hasXSave: false)
        let savedTSC = try #require(state.msrs.first { $0.index == VCPU.tscMSR }).value

        func restore(advancingBy nanoseconds: UInt64) throws -> RealModeGuest {
            let copy = try GuestMemory(anonymous: [(GuestAddress(0), RealModeGuest.memorySize)])
            try copy.write(try original.memory.read(count: Int(RealModeGuest.memorySize), at: GuestAddress(0)), at: GuestAddress(0))
            let restored = try RealModeGuest(code: [], memory: copy, irqchip: true)
            try restored.vcpu.setCPUID(cpuid)
            try restored.vcpu.restoreState(state, advancingTSCBy: nanoseconds)
            return restored
        }
        let advanced = try restore(advancingBy: 5_000_000_000)
        let now = try advanced.vcpu.msrs([VCPU.tscMSR])[0].value
        #expect(now >= savedTSC + khz * 5000 && now < savedTSC + khz * 6000, "TSC \(now), saved \(savedTSC), \(khz) kHz")
        let deadline = try advanced.vcpu.msrs([VCPU.tscDeadlineMSR])[0].value
        #expect(deadline == tsc + khz * 1000 && deadline < now, "the deadline is kept, and overdue")
        // Not advanced, the same deadline is still about a second away.
        let plain = try restore(advancingBy: 0)
        let plainNow = try plain.vcpu.msrs([VCPU.tscMSR])[0].value
        #expect(try plain.vcpu.msrs([VCPU.tscDeadlineMSR])[0].value == tsc + khz * 1000)
        #expect(plainNow < tsc + khz * 1000, "TSC \(plainNow)")
    }

    /// Whether a TSC written through KVM_SET_MSRS is the TSC the guest then has.
    static var tscIsSettable: Bool {
        guard TestHost.hasKVM, let guest = try? RealModeGuest(code: Self.counter, irqchip: true),
              let tsc = try? guest.vcpu.msrs([VCPU.tscMSR])[0].value else { return false }
        let wanted = tsc + 1 << 44
        guard (try? guest.vcpu.setMSRs([MSREntry(index: VCPU.tscMSR, value: wanted)])) != nil,
              let now = try? guest.vcpu.msrs([VCPU.tscMSR])[0].value else { return false }
        return now >= wanted
    }

    @Test func stateIsCodable() throws {
        let guest = try RealModeGuest(code: Self.counter, irqchip: true)
        _ = try guest.nextOut()
        let state = try guest.vcpu.saveState(msrIndices: [0x174, 0x10], hasXSave: false)
        #expect(state.xsave == nil)
        #expect(state.msrs.map(\.index) == [0x174, 0x10])
        #expect(state.registers.rip > RealModeGuest.codeAddress)
        // Restoring a truncated LAPIC page is refused with a clear message.
        var broken = state
        broken.localAPIC = Array(state.localAPIC.prefix(100))
        #expect { try guest.vcpu.restoreState(broken) } throws: {
            ($0 as! SwiftletError).message.contains("local APIC state must be 1024 bytes")
        }
    }
}
