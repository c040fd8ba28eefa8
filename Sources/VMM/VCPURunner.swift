import GuestMemory
import Hypervisor
import SwiftletSystem

/// The loop on a vCPU's thread: run the guest, serve its I/O exits, stop when the machine stops.
///
/// Generic over the vCPU type so that the loop calls the backend's vCPU directly, with no dynamic
/// dispatch per exit: `Machine.runVCPU` specializes it for the default backend.
struct VCPURunner<V: HypervisorVCPU> {
    let vcpu: V
    let devices: MachineDevices
    let memory: GuestMemory
    let controller: MachineController
    let tracePorts: Bool

    /// Runs until the machine stops; returns the port trace when tracing.
    func run() -> [UInt16: Int] {
        var trace: [UInt16: Int] = [:]
        while !controller.isStopping {
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                controller.stop(.vmmError(error.description))
                break
            }
            switch exit {
            case .io(let io):
                if tracePorts { trace[io.port, default: 0] += 1 }
                if io.count == 1 {
                    devices.ports.dispatch(port: io.port, isWrite: io.isWrite, data: io.data)
                } else {
                    // String I/O: one access per item.
                    for i in 0..<io.count {
                        let item = UnsafeMutableRawBufferPointer(rebasing: io.data[(i * io.size)..<((i + 1) * io.size)])
                        devices.ports.dispatch(port: io.port, isWrite: io.isWrite, data: item)
                    }
                }
            case .mmio(let access):
                // Unclaimed addresses read as all-ones and drop writes, as on a real bus.
                devices.mmio.dispatch(address: access.address, isWrite: access.isWrite, data: access.data)
            case .interrupted:
                controller.parkIfPaused() // then the loop condition decides
            case .halt:
                controller.stop(.vmmError("vCPU \(vcpu.id) halted with no in-kernel local APIC"))
            case .shutdown:
                controller.stop(.tripleFault(cpu: vcpu.id, rip: faultingRIP()))
            case .systemEvent(let type):
                switch type {
                case VCPUExit.systemEventShutdown: controller.stop(.powerOff)
                case VCPUExit.systemEventReset: controller.stop(.reset)
                default: controller.stop(.guestPanic) // a crash, and later kinds
                }
            case .internalError(let error):
                controller.stop(internalErrorExit(error))
            case .failedEntry(let reason):
                controller.stop(.failedEntry(cpu: vcpu.id, reason: reason))
            case .other(let reason):
                controller.stop(.vmmError("vCPU \(vcpu.id) stopped with unhandled KVM exit reason \(reason)"))
            }
        }
        return trace
    }

    /// The RIP of a vCPU that shut down (triple fault), or nil when KVM has already reset it: on
    /// AMD the VMCB is undefined after a shutdown, so KVM INITs the vCPU (RIP 0xfff0, CS 0xf000).
    func faultingRIP() -> UInt64? {
        guard let rip = try? vcpu.registers().rip else { return nil }
        if rip == 0xFFF0, let cs = try? vcpu.specialRegisters().cs, cs.selector == 0xF000 { return nil }
        return rip
    }

    /// Describes an internal error with the faulting RIP and instruction bytes (from KVM, or read
    /// from guest memory through the vCPU's page tables when KVM does not supply them).
    func internalErrorExit(_ error: InternalError) -> MachineExit {
        let rip = (try? vcpu.registers().rip) ?? 0
        var bytes = error.instructionBytes
        if bytes == nil || bytes?.isEmpty == true {
            let cs = try? vcpu.specialRegisters().cs.base
            if let physical = try? vcpu.translate(rip &+ (cs ?? 0)) {
                bytes = (0..<15).compactMap { try? memory.read(UInt8.self, at: GuestAddress(physical &+ UInt64($0))) }
            }
        }
        return .internalError(cpu: vcpu.id, rip: rip, detail: error.description, instructionBytes: bytes)
    }
}
