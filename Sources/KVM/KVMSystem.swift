import CLinux
import Glibc
import Hypervisor
import SwiftletSystem

/// What provides /dev/kvm on this host.
public enum KVMBackend: Sendable, Equatable, CustomStringConvertible {
    /// Hardware virtualization (Intel VT-x or AMD-V).
    case hardware(vendor: String)
    /// PVM: KVM implemented with software (paravirtualized) virtualization. Only PVM-enabled guest
    /// kernels run on it at native speed; unmodified kernels are instruction-emulated and fail.
    case pvm
    /// KVM works but the host CPU shows neither VT-x nor AMD-V and no known software backend.
    case unknown

    public var description: String {
        switch self {
        case .hardware(let vendor): return "hardware virtualization (\(vendor))"
        case .pvm: return "PVM (software virtualization)"
        case .unknown: return "an unknown KVM backend"
        }
    }

    /// Detects the backend from sysfs and the host's CPUID. `sysfs` is a parameter for tests.
    public static func detect(sysfs: String = "/sys", cpuinfo: String = "/proc/cpuinfo") -> KVMBackend {
        if access(sysfs + "/module/kvm_pvm", F_OK) == 0 { return .pvm }
        let flags = cpuFlags(cpuinfo: cpuinfo)
        if flags.contains("vmx") { return .hardware(vendor: "Intel VT-x") }
        if flags.contains("svm") { return .hardware(vendor: "AMD-V") }
        return .unknown
    }

    static func cpuFlags(cpuinfo: String) -> Set<Substring> {
        guard let text = try? OwnedFileDescriptor.readSmallTextFile(cpuinfo) else { return [] }
        for line in text.split(separator: "\n") where line.hasPrefix("flags") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            return Set(line[line.index(after: colon)...].split(separator: " "))
        }
        return []
    }
}

/// An open /dev/kvm: the entry point for creating virtual machines and asking what the host supports.
public final class KVMSystem: Sendable {
    public let descriptor: OwnedFileDescriptor
    public let path: String
    /// Size of the per-vCPU `kvm_run` mapping.
    public let vcpuMmapSize: Int

    /// The KVM API version this code speaks; every kernel since 2.6.22 reports it.
    public static let apiVersion: Int32 = 12

    /// Opens the KVM device at `path` (default `/dev/kvm`), explaining what to do when that fails.
    public init(path: String = "/dev/kvm") throws(SwiftletError) {
        let fd: OwnedFileDescriptor
        do {
            fd = try OwnedFileDescriptor.open(path, flags: O_RDWR)
        } catch {
            switch error.cause {
            case .noSuchFileOrDirectory?:
                throw SwiftletError(.notFound, "\(path) does not exist: this host has no KVM; enable virtualization (VT-x/AMD-V) in firmware and load the kvm_intel or kvm_amd module", cause: error.cause)
            case .permissionDenied?, .notPermitted?:
                throw SwiftletError(.permissionDenied, "\(path) is not accessible: add your user to the kvm group (sudo usermod -aG kvm $USER) and log in again", cause: error.cause)
            default:
                throw SwiftletError(error.code, "cannot open \(path)", cause: error.cause)
            }
        }
        let version = swiftlet_ioctl_int(fd.rawValue, SWIFTLET_KVM_GET_API_VERSION, 0)
        guard version == KVMSystem.apiVersion else {
            if version < 0 {
                throw SwiftletError(.unsupported, "\(path) is not a KVM device (KVM_GET_API_VERSION failed)", cause: currentErrno)
            }
            throw SwiftletError(.unsupported, "\(path) speaks KVM API \(version), Swiftlet needs API \(KVMSystem.apiVersion)")
        }
        let size = swiftlet_ioctl_int(fd.rawValue, SWIFTLET_KVM_GET_VCPU_MMAP_SIZE, 0)
        guard size > 0 else { throw SwiftletError.system("KVM_GET_VCPU_MMAP_SIZE failed", errno: currentErrno) }
        self.descriptor = fd
        self.path = path
        self.vcpuMmapSize = Int(size)
    }

    /// The value KVM_CHECK_EXTENSION reports for `capability` (0 when absent).
    public func capability(_ capability: Int32) -> Int32 {
        max(0, swiftlet_ioctl_int(descriptor.rawValue, SWIFTLET_KVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// The most vCPUs one VM may have.
    public var maxVCPUs: Int {
        let max = capability(KVM_CAP_MAX_VCPUS)
        return Int(max > 0 ? max : capability(KVM_CAP_NR_VCPUS))
    }

    /// The number of vCPUs KVM recommends (the host's CPU count).
    public var recommendedVCPUs: Int { Int(capability(KVM_CAP_NR_VCPUS)) }

    /// Fails with a clear message unless every listed capability is present.
    public func require(_ capabilities: [(Int32, String)]) throws(SwiftletError) {
        for (cap, name) in capabilities where capability(cap) == 0 {
            throw SwiftletError(.unsupported, "the host's KVM lacks \(name), which Swiftlet needs")
        }
    }

    /// The CPUID leaves KVM can offer guests on this host.
    public func supportedCPUID() throws(SwiftletError) -> [CPUIDEntry] {
        var capacity = 128
        while true {
            let entries = try withCPUIDBuffer(capacity: capacity) { buffer, header throws(SwiftletError) -> [CPUIDEntry]? in
                let result = swiftlet_ioctl_ptr(descriptor.rawValue, SWIFTLET_KVM_GET_SUPPORTED_CPUID, header)
                if result < 0 {
                    if currentErrno == .argListTooLong || currentErrno == .noMemory { return nil }
                    throw SwiftletError.system("KVM_GET_SUPPORTED_CPUID failed", errno: currentErrno)
                }
                return Array(buffer.prefix(Int(header.pointee.nent))).map(CPUIDEntry.init)
            }
            if let entries { return entries }
            capacity *= 2
            guard capacity <= 4096 else { throw SwiftletError(.unsupported, "KVM_GET_SUPPORTED_CPUID wants an unreasonable number of entries") }
        }
    }

    /// The MSR indices KVM saves and restores for a vCPU.
    public func msrIndexList() throws(SwiftletError) -> [UInt32] {
        var capacity: UInt32 = 256
        while true {
            let headerSize = MemoryLayout<kvm_msr_list>.size
            let raw = UnsafeMutableRawPointer.allocate(byteCount: headerSize + Int(capacity) * 4, alignment: 8)
            defer { raw.deallocate() }
            // SAFETY: the allocation holds the header plus `capacity` indices, as nmsrs tells KVM.
            let list = raw.bindMemory(to: kvm_msr_list.self, capacity: 1)
            list.pointee.nmsrs = capacity
            if swiftlet_ioctl_ptr(descriptor.rawValue, SWIFTLET_KVM_GET_MSR_INDEX_LIST, list) < 0 {
                if currentErrno == .argListTooLong { capacity = list.pointee.nmsrs; continue }
                throw SwiftletError.system("KVM_GET_MSR_INDEX_LIST failed", errno: currentErrno)
            }
            let indices = (raw + headerSize).bindMemory(to: UInt32.self, capacity: Int(list.pointee.nmsrs))
            return Array(UnsafeBufferPointer(start: indices, count: Int(list.pointee.nmsrs)))
        }
    }

    /// Creates a virtual machine.
    public func createVirtualMachine() throws(SwiftletError) -> VirtualMachine {
        let fd = try systemCall("KVM_CREATE_VM failed") { swiftlet_ioctl_int(descriptor.rawValue, SWIFTLET_KVM_CREATE_VM, 0) }
        return VirtualMachine(descriptor: OwnedFileDescriptor(taking: fd), system: self)
    }
}

/// Calls `body` with a kvm_cpuid2 buffer of `capacity` entries (header, then the entry array).
func withCPUIDBuffer<R>(capacity: Int, _ body: (UnsafeMutableBufferPointer<kvm_cpuid_entry2>, UnsafeMutablePointer<kvm_cpuid2>) throws(SwiftletError) -> R) throws(SwiftletError) -> R {
    let headerSize = MemoryLayout<kvm_cpuid2>.size
    let raw = UnsafeMutableRawPointer.allocate(byteCount: headerSize + capacity * MemoryLayout<kvm_cpuid_entry2>.stride, alignment: 8)
    defer { raw.deallocate() }
    raw.initializeMemory(as: UInt8.self, repeating: 0, count: headerSize + capacity * MemoryLayout<kvm_cpuid_entry2>.stride)
    // SAFETY: the allocation holds the header followed by `capacity` entries, as nent tells KVM.
    let header = raw.bindMemory(to: kvm_cpuid2.self, capacity: 1)
    header.pointee.nent = UInt32(capacity)
    let entries = (raw + headerSize).bindMemory(to: kvm_cpuid_entry2.self, capacity: capacity)
    return try body(UnsafeMutableBufferPointer(start: entries, count: capacity), header)
}

extension KVMSystem: Hypervisor {
    /// The KVM capability that stands for `feature`, and how an error names it.
    static func capability(for feature: HypervisorFeature) -> (Int32, String) {
        switch feature {
        case .interruptController: return (KVM_CAP_IRQCHIP, "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)")
        case .userMemory: return (KVM_CAP_USER_MEMORY, "user memory regions (KVM_CAP_USER_MEMORY)")
        case .extendedCPUID: return (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID")
        case .immediateExit: return (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT")
        case .tscDeadlineTimer: return (KVM_CAP_TSC_DEADLINE_TIMER, "the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER)")
        case .xsave: return (KVM_CAP_XSAVE, "XSAVE state (KVM_CAP_XSAVE)")
        case .tscScaling: return (KVM_CAP_TSC_CONTROL, "TSC scaling (KVM_CAP_TSC_CONTROL)")
        }
    }

    public func supports(_ feature: HypervisorFeature) -> Bool {
        capability(Self.capability(for: feature).0) > 0
    }

    public func require(_ features: [HypervisorFeature]) throws(SwiftletError) {
        try require(features.map(Self.capability(for:)))
    }

    /// True on a PVM-backed /dev/kvm (`KVMBackend.detect()`).
    public var requiresParavirtualizedGuest: Bool { KVMBackend.detect() == .pvm }
}
