import Hypervisor
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// The VMM runs on any `Hypervisor`: here a fake one, with no /dev/kvm (these tests run on any
/// host). The machines point `kvmPath` at a device that does not exist, so a VMM that opened KVM
/// behind the seam's back would fail instead.
@Suite struct HypervisorSeamTests {
    static let missingKVM = "/nonexistent/kvm"

    func machine() -> TinyMachine {
        var machine = TinyMachine(code: TinyGuest.spin)
        machine.config.kvmPath = Self.missingKVM
        return machine
    }

    @Test func machineRunsOnAFakeHypervisor() throws {
        let fake = FakeHypervisor(script: [
            .portWrite(port: Machine.Ports.serial, byte: UInt8(ascii: "h")),
            .portWrite(port: Machine.Ports.serial, byte: UInt8(ascii: "i")),
            .systemEvent(type: VCPUExit.systemEventShutdown),
        ])
        let (report, output) = try machine().run(hypervisor: { _ in fake })
        #expect(report.exit == .powerOff)
        #expect(output == "hi", "the scripted port writes reach the serial port and the console")
        #expect(report.exitsToUserspace == 3, "the vCPU loop ran the fake's vCPU, one exit a step")

        // The machine was built on the fake: memory in its slots, the interrupt controller, and
        // the boot vCPU set up to enter the loaded kernel with the CPUID the VMM shaped.
        let vm = try #require(fake.machines.withLock { $0.first })
        let state = vm.state.withLock { (slots: $0.slots, irqchip: $0.hasInterruptController, vcpus: $0.vcpus) }
        #expect(state.irqchip)
        #expect(state.slots.values.reduce(0) { $0 + $1.size } == 64 << 20)
        #expect(state.slots.values.allSatisfy { !$0.logDirtyPages })
        let vcpu = try #require(state.vcpus.first)
        #expect(try vcpu.registers().rip == 0x100000)
        let leaf1 = try #require(vcpu.state.withLock { $0.cpuid }.first { $0.function == 1 })
        #expect(leaf1.ecx & CPUIDSetup.leaf1HypervisorBit != 0)
        #expect(leaf1.ecx & CPUIDSetup.leaf1TSCDeadlineBit != 0, "the fake offers the TSC-deadline timer")
    }

    @Test func aMissingFeatureFailsTheBuildWithAClearError() throws {
        let fake = FakeHypervisor(features: Set(HypervisorFeature.allCases).subtracting([.immediateExit]), script: [])
        #expect { try machine().run(hypervisor: { _ in fake }) } throws: {
            let e = $0 as! SwiftletError
            return e.code == .unsupported && e.message == "the fake hypervisor lacks immediate vCPU exits, which Swiftlet needs"
        }
        #expect(fake.machines.withLock { $0.isEmpty }, "no VM is created on a hypervisor that lacks a required feature")
    }

    @Test func theDefaultBackendIsKVMAtTheShapesPath() throws {
        #expect { try machine().run() } throws: {
            ($0 as! SwiftletError).message.contains("\(Self.missingKVM) does not exist")
        }
    }
}
