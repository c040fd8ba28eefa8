import GuestMemory
import Hypervisor
import KVM
import SwiftletSystem

// The one file of the VMM that knows its default backend is KVM: every other file sees only the
// protocols of the Hypervisor target.

/// Opens the hypervisor a machine runs on, given the machine's shape (which names the KVM device
/// as `kvmPath`). `Machine.defaultHypervisor` opens KVM; a test double or another backend is
/// another function of this type.
public typealias HypervisorProvider = @Sendable (MachineShape) throws(SwiftletError) -> any Hypervisor

extension Machine {
    /// KVM at the shape's `kvmPath`.
    public static func defaultHypervisor(for shape: MachineShape) throws(SwiftletError) -> any Hypervisor {
        try KVMSystem(path: shape.kvmPath)
    }

    /// The CPUID the KVM at `kvmPath` offers its guests on this host; nil when it cannot be
    /// opened (the machine's own start then says why).
    public static func hostCPUID(kvmPath: String = "/dev/kvm") -> [CPUIDEntry]? {
        try? KVMSystem(path: kvmPath).supportedCPUID()
    }

    /// Runs `vcpu`'s loop on the calling thread (its vCPU thread) until the machine stops.
    ///
    /// The loop is generic over the vCPU type: for KVM's vCPU it is specialized here, so each exit
    /// costs a direct call to `KVM.VCPU.run()`, as before the seam. Any other backend's vCPU runs
    /// the same loop with the existential opened once, here, and its calls go through the
    /// protocol's witness table.
    static func runVCPU(_ vcpu: any HypervisorVCPU, devices: MachineDevices, memory: GuestMemory, controller: MachineController,
                        tracePorts: Bool) -> [UInt16: Int] {
        func loop<V: HypervisorVCPU>(_ vcpu: V) -> [UInt16: Int] {
            VCPURunner(vcpu: vcpu, devices: devices, memory: memory, controller: controller, tracePorts: tracePorts).run()
        }
        if let kvm = vcpu as? KVM.VCPU { return loop(kvm) }
        return loop(vcpu)
    }
}
