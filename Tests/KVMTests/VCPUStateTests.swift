import CLinux
import GuestMemory
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
    @Test func aPendingTSCDeadlineSurvivesTheRestore() throws {
        let original = try RealModeGuest(code: Self.counter, irqchip: true)
        // KVM offers the deadline mode only to a guest whose CPUID has it.
        let cpuid = try original.system.supportedCPUID().map { entry in
            var e = entry
            if e.function == 1 { e.ecx |= 1 << 24 }
            return e
        }
        try original.vcpu.setCPUID(cpuid)
        _ = try original.nextOut()
        var apic = try original.vcpu.localAPIC()
        let lvtTimer = 0x320
        let deadlineMode: UInt32 = 2 << 17
        let vector: UInt32 = 0xEC
        for i in 0..<4 { apic[lvtTimer + i] = UInt8(truncatingIfNeeded: (deadlineMode | vector) >> (8 * UInt32(i))) }
        try original.vcpu.setLocalAPIC(apic)
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
