import CLinux
import Glibc
import Hypervisor
import SwiftletSystem

/// A KVM virtual machine: memory slots, the in-kernel interrupt controllers, and its vCPUs.
///
/// Shared by the VMM's threads: every method is a single ioctl, which the kernel serialises.
public final class VirtualMachine: Sendable {
    public let descriptor: OwnedFileDescriptor
    public let system: KVMSystem

    init(descriptor: consuming OwnedFileDescriptor, system: KVMSystem) {
        self.descriptor = descriptor
        self.system = system
    }

    private func ioctl(_ name: @autoclosure () -> String, _ request: UInt, _ arg: UnsafeMutableRawPointer) throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("\(name()) failed") { swiftlet_ioctl_ptr(fd, request, arg) }
    }

    /// Places `size` bytes of host memory at `guestAddress` in memory slot `slot`.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer,
                                logDirtyPages: Bool = false, readOnly: Bool = false) throws(SwiftletError) {
        var region = kvm_userspace_memory_region()
        region.slot = slot
        region.flags = (logDirtyPages ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0) | (readOnly ? UInt32(KVM_MEM_READONLY) : 0)
        region.guest_phys_addr = guestAddress
        region.memory_size = size
        region.userspace_addr = UInt64(UInt(bitPattern: host))
        try ioctl("KVM_SET_USER_MEMORY_REGION (slot \(slot))", SWIFTLET_KVM_SET_USER_MEMORY_REGION, &region)
    }

    /// Where Intel VMX keeps its real-mode TSS (three pages); must be outside guest RAM.
    public func setTSSAddress(_ address: UInt64) throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("KVM_SET_TSS_ADDR failed") { swiftlet_ioctl_int(fd, SWIFTLET_KVM_SET_TSS_ADDR, UInt(address)) }
    }

    /// Where Intel VMX keeps its identity page table for real mode (one page); outside guest RAM.
    public func setIdentityMapAddress(_ address: UInt64) throws(SwiftletError) {
        var value = address
        try ioctl("KVM_SET_IDENTITY_MAP_ADDR", SWIFTLET_KVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// Creates the in-kernel PIC, IOAPIC and per-vCPU local APICs.
    public func createInterruptController() throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("KVM_CREATE_IRQCHIP failed") { swiftlet_ioctl_int(fd, SWIFTLET_KVM_CREATE_IRQCHIP, 0) }
    }

    /// Creates the in-kernel i8254 PIT.
    public func createPIT() throws(SwiftletError) {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        try ioctl("KVM_CREATE_PIT2", SWIFTLET_KVM_CREATE_PIT2, &config)
    }

    /// Drives interrupt line `irq` (a GSI) of the in-kernel IOAPIC/PIC to `level`.
    public func setInterruptLine(_ irq: UInt32, level: Bool) throws(SwiftletError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        try ioctl("KVM_IRQ_LINE", SWIFTLET_KVM_IRQ_LINE, &line)
    }

    /// Makes a write to `eventfd` raise interrupt `gsi` inside the kernel, without a trip through the VMM.
    public func registerIRQFD(_ eventfd: Int32, gsi: UInt32) throws(SwiftletError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(eventfd)
        irqfd.gsi = gsi
        try ioctl("KVM_IRQFD", SWIFTLET_KVM_IRQFD, &irqfd)
    }

    /// Enables a VM-wide capability.
    public func enableCapability(_ capability: UInt32, args: [UInt64] = []) throws(SwiftletError) {
        var cap = kvm_enable_cap()
        cap.cap = capability
        let a = args + [0, 0, 0, 0]
        cap.args = (a[0], a[1], a[2], a[3])
        try ioctl("KVM_ENABLE_CAP(\(capability))", SWIFTLET_KVM_ENABLE_CAP, &cap)
    }

    /// The guest's kvmclock value (nanoseconds), for pause and snapshot.
    public func clock() throws(SwiftletError) -> UInt64 {
        var data = kvm_clock_data()
        try ioctl("KVM_GET_CLOCK", SWIFTLET_KVM_GET_CLOCK, &data)
        return data.clock
    }

    public func setClock(_ nanoseconds: UInt64) throws(SwiftletError) {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        try ioctl("KVM_SET_CLOCK", SWIFTLET_KVM_SET_CLOCK, &data)
    }

    /// Creates vCPU `id` (its initial APIC ID).
    public func createVCPU(id: UInt32) throws(SwiftletError) -> VCPU {
        let fd = try systemCall("KVM_CREATE_VCPU(\(id)) failed") {
            swiftlet_ioctl_int(descriptor.rawValue, SWIFTLET_KVM_CREATE_VCPU, UInt(id))
        }
        let owned = OwnedFileDescriptor(taking: fd)
        let run = try MemoryMapping.file(fd: owned.rawValue, size: system.vcpuMmapSize, writable: true, shared: true)
        return VCPU(id: id, descriptor: owned, run: run)
    }
}

extension VirtualMachine: HypervisorVM {}
