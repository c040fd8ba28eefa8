import CLinux
import Glibc
import GuestMemory
import Hypervisor
import SwiftletSystem
import Testing
import TestSupport
@testable import KVM

@Suite struct KVMSystemTests {
    @Test func missingDeviceSaysWhatToDo() {
        #expect { try KVMSystem(path: "/nonexistent/kvm") } throws: {
            let e = $0 as! SwiftletError
            return e.code == .notFound && e.message.contains("does not exist") && e.message.contains("kvm_intel or kvm_amd")
        }
    }

    @Test func aDeviceThatIsNotKVMIsRejected() {
        #expect { try KVMSystem(path: "/dev/null") } throws: {
            let e = $0 as! SwiftletError
            return e.code == .unsupported && e.message.contains("not a KVM device")
        }
    }

    @Test func backendDetectionReadsSysfsAndCPUFlags() throws {
        let dir = TemporaryDirectory()
        let cpuinfo = dir.write("cpuinfo", Array("processor\t: 0\nflags\t\t: fpu vme svm sse\n".utf8))
        #expect(KVMBackend.detect(sysfs: dir.path, cpuinfo: cpuinfo) == .hardware(vendor: "AMD-V"))
        let intel = dir.write("cpuinfo-intel", Array("flags : fpu vmx\n".utf8))
        #expect(KVMBackend.detect(sysfs: dir.path, cpuinfo: intel) == .hardware(vendor: "Intel VT-x"))
        let neither = dir.write("cpuinfo-none", Array("flags : fpu sse2\n".utf8))
        #expect(KVMBackend.detect(sysfs: dir.path, cpuinfo: neither) == .unknown)
        _ = Subprocess.run(["/bin/mkdir", "-p", dir.path + "/module/kvm_pvm"])
        #expect(KVMBackend.detect(sysfs: dir.path, cpuinfo: cpuinfo) == .pvm)
    }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func reportsCapabilitiesCPUIDAndMSRs() throws {
        let kvm = try KVMSystem()
        #expect(kvm.vcpuMmapSize >= 4096)
        #expect(kvm.maxVCPUs >= 1)
        #expect(kvm.capability(KVM_CAP_USER_MEMORY) > 0)
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        #expect(cpuid.contains { $0.function == 1 })
        #expect(try !kvm.msrIndexList().isEmpty)
        #expect(throws: SwiftletError.self) { try kvm.require([(999_999, "an imaginary capability")]) }
    }
}

@Suite(.enabled(if: TestHost.hasKVM, "needs /dev/kvm")) struct VCPUExitTests {
    @Test func portAndMMIOExitsCarryData() throws {
        let code = Real.movDX(0x10) + Real.movAL(0x42) + Real.outDXAL + Real.inALDX + Real.addAL(1) + Real.outDXAL
            + Real.storeAL(0x8000) + Real.loadAL(0x9000) + Real.outDXAL + Real.hlt
        let guest = try RealModeGuest(code: code)
        guard let first = try guest.nextOut() else { Issue.record("expected OUT"); return }
        #expect(first == (0x10, 0x42))
        guard case .io(let input) = try guest.next(), !input.isWrite else { Issue.record("expected IN"); return }
        #expect(input.port == 0x10 && input.size == 1 && input.count == 1)
        input.data[0] = 0x20
        #expect(try guest.nextOut()! == (0x10, 0x21))
        guard case .mmio(let store) = try guest.next() else { Issue.record("expected MMIO write"); return }
        #expect(store.isWrite && store.address == 0x8000 && Array(store.data) == [0x21])
        guard case .mmio(let load) = try guest.next() else { Issue.record("expected MMIO read"); return }
        #expect(!load.isWrite && load.address == 0x9000 && load.data.count == 1)
        load.data[0] = 0x77
        #expect(try guest.nextOut()! == (0x10, 0x77))
        guard case .halt = try guest.next() else { Issue.record("expected HLT"); return }
        #expect(guest.vcpu.exitCount >= 6)
    }

    @Test func guestWritesLandInHostMemory() throws {
        let guest = try RealModeGuest(code: Real.movAL(0x5A) + Real.storeAL(0x2000) + Real.hlt)
        guard case .halt = try guest.next() else { Issue.record("expected HLT"); return }
        #expect(try guest.memory.read(UInt8.self, at: GuestAddress(0x2000)) == 0x5A)
    }

    @Test func registersRoundTrip() throws {
        let guest = try RealModeGuest(code: Real.hlt)
        var regs = try guest.vcpu.registers()
        regs.rax = 0x1122_3344_5566_7788
        regs.r15 = 42
        regs.rsp = 0x3000
        try guest.vcpu.setRegisters(regs)
        #expect(try guest.vcpu.registers() == regs)
        var sregs = try guest.vcpu.specialRegisters()
        sregs.ds.base = 0x1000
        sregs.ds.selector = 0x100
        try guest.vcpu.setSpecialRegisters(sregs)
        let back = try guest.vcpu.specialRegisters()
        #expect(back.ds.base == 0x1000 && back.ds.selector == 0x100)
        try guest.vcpu.setMSRs([MSREntry(index: 0x174, value: 0x10)]) // IA32_SYSENTER_CS
        #expect(try guest.vcpu.msrs([0x174]) == [MSREntry(index: 0x174, value: 0x10)])
        #expect(throws: SwiftletError.self) { try guest.vcpu.setMSRs([MSREntry(index: 0xDEAD_BEEF, value: 1)]) }
    }

    @Test func tripleFaultIsAShutdownExit() throws {
        // 32-bit protected mode with an empty IDT (limit 0): #UD cannot be delivered (#GP),
        // nor can the #GP (#DF), nor the #DF: the CPU shuts down.
        let guest = try RealModeGuest(code: [0x0F, 0x0B] + Real.hlt) // ud2
        var sregs = try guest.vcpu.specialRegisters()
        let code = Segment(base: 0, limit: 0xFFFF_FFFF, selector: 0x8, type: 0xB, present: true, db: true, s: true, g: true)
        let data = Segment(base: 0, limit: 0xFFFF_FFFF, selector: 0x10, type: 0x3, present: true, db: true, s: true, g: true)
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.ss = data; sregs.fs = data; sregs.gs = data
        sregs.tr = Segment(base: 0, limit: 0x67, selector: 0x18, type: 0xB, present: true)
        sregs.idt = DescriptorTable(base: 0, limit: 0)
        sregs.cr0 |= 1
        try guest.vcpu.setSpecialRegisters(sregs)
        var regs = try guest.vcpu.registers()
        regs.rsp = 0x3000
        try guest.vcpu.setRegisters(regs)
        let exit = try guest.next()
        guard case .shutdown = exit else { Issue.record("expected a triple-fault shutdown, got \(exit)"); return }
    }

    @Test func requestExitInterruptsARunningVCPU() throws {
        let guest = try RealModeGuest(code: Real.spin)
        let vcpu = guest.vcpu
        let result = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        result.initialize(to: 0)
        defer { result.deallocate() }
        let box = UncheckedBox(result)
        let thread = try OSThread.start(name: "spin") {
            if case .interrupted = try? vcpu.run() { box.value.pointee = 1 } else { box.value.pointee = 2 }
        }
        usleep(20_000)
        vcpu.requestExit()
        thread.interrupt()
        thread.join()
        #expect(result.pointee == 1)
        #expect(vcpu.exitRequested)
        vcpu.clearExitRequest()
        #expect(!vcpu.exitRequested)
    }

    /// On PVM, CPL0 code is emulated instruction by instruction and POPCNT is not emulated: the
    /// exit must carry the failing RIP and bytes. On hardware KVM the instruction simply runs.
    @Test func emulationFailureCarriesTheInstruction() throws {
        let guest = try RealModeGuest(code: Real.popcntAXAX + Real.movDX(0x10) + Real.outDXAL + Real.hlt)
        let exit = try guest.next()
        if TestHost.isPVM {
            guard case .internalError(let error) = exit else { Issue.record("expected an internal error, got \(exit)"); return }
            #expect(error.isEmulationFailure)
            if let bytes = error.instructionBytes { #expect(Array(bytes.prefix(4)) == Real.popcntAXAX) }
            #expect(try guest.vcpu.registers().rip == RealModeGuest.codeAddress)
        } else {
            guard case .io(let io) = exit else { Issue.record("expected the OUT after POPCNT, got \(exit)"); return }
            #expect(io.port == 0x10)
        }
    }
}

/// Moves a non-Sendable value into a @Sendable closure in a test where the hand-off is ordered by join().
final class UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
