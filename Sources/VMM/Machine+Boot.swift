import CLinux
import GuestMemory
import Hypervisor
import LinuxBoot
import SwiftletSystem

extension Machine {
    /// The boot builder: assembles a machine of `config`'s shape in fresh memory, loads the
    /// kernel (and initrd) with firmware tables that list the assembled devices, and sets up the
    /// vCPUs to enter it.
    func buildForBoot(_ config: MachineConfig, controller: MachineController, phases: inout [(name: String, end: UInt64)],
                      onBootMarker: (@Sendable (UInt64) -> Void)?) throws(SwiftletError) -> BuiltMachine {
        try config.shape.validate()
        let hypervisor = try openHypervisor(config.shape)
        let parts = try Self.assemble(config.shape, hypervisor: hypervisor, controller: controller, vsockPorts: vsockPorts,
                                      logDirtyPages: false, phases: &phases, onBootMarker: onBootMarker) { ranges throws(SwiftletError) in
            try GuestMemory(anonymous: ranges)
        }
        do throws(SwiftletError) {
            var acpi = ACPIConfiguration(cpuCount: config.cpuCount, sleepControlPort: Ports.sleepControl, pvpanicPort: Ports.pvpanic)
            acpi.virtioDevices = parts.devices.virtioSlots
            let plan = try LinuxBootLoader.prepare(
                LinuxBootConfiguration(kernelPath: config.kernelPath, initrdPath: config.initrdPath,
                                       commandLine: config.commandLine, acpi: acpi),
                memory: parts.memory)
            if plan.kernel.isLinux && !config.allowPVM && hypervisor.requiresParavirtualizedGuest {
                throw SwiftletError(.unsupported, Self.pvmMessage(kvmPath: config.kvmPath))
            }
            phases.append(("load", MonotonicClock.now))

            if let template = config.cpuTemplate {
                let missing = template.missing(from: parts.supportedCPUID)
                guard missing.isEmpty else {
                    let lower = CPUTemplate.allCases.prefix { $0 != template }.map(\.rawValue)
                    throw SwiftletError(.unsupported, "this host's CPU (as its KVM offers it) lacks \(missing.joined(separator: ", ")) of the \(template.rawValue) CPU template: "
                                        + (lower.isEmpty ? "run without --cpu-template" : "use a lower one (\(lower.joined(separator: ", "))) or none"))
                }
            }
            let tscDeadline = hypervisor.supports(.tscDeadlineTimer)
            let msrs = Set(parts.msrIndices)
            var vcpus: [any HypervisorVCPU] = []
            var cpuids: [[CPUIDEntry]] = []
            for id in 0..<UInt32(config.cpuCount) {
                let vcpu = try parts.vm.createVCPU(id: id)
                var cpuid = CPUIDSetup.entries(from: parts.supportedCPUID, cpu: id, count: config.cpuCount, tscDeadline: tscDeadline)
                if let template = config.cpuTemplate { cpuid = template.apply(to: cpuid) }
                try VCPUBootSetup.configure(vcpu, cpuid: cpuid, supportedMSRs: msrs, boot: id == 0 ? plan.cpu : nil)
                vcpus.append(vcpu)
                cpuids.append(cpuid)
            }
            return BuiltMachine(parts: parts, vcpus: vcpus, cpuid: cpuids, guestIsLinux: plan.kernel.isLinux, prefetch: [])
        } catch {
            parts.tearDown()
            throw error
        }
    }
}
