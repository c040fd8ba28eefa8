import CLinux
import Glibc
import Hypervisor
import SwiftletSystem

/// One virtual CPU: its file descriptor and the shared `kvm_run` page.
///
/// A vCPU belongs to one thread, which calls `run()` in a loop. Other threads may only call
/// `requestExit()`, which makes the next or current KVM_RUN return promptly.
public final class VCPU: @unchecked Sendable {
    // SAFETY (Sendable): everything but `requestExit` is used by the owning vCPU thread only;
    // `requestExit` stores one byte that KVM defines as writable at any time.
    public let id: UInt32
    let descriptor: OwnedFileDescriptor
    let runPage: MemoryMapping
    /// Exits to userspace (returns from KVM_RUN) so far.
    public private(set) var exitCount: UInt64 = 0

    init(id: UInt32, descriptor: consuming OwnedFileDescriptor, run: consuming MemoryMapping) {
        self.id = id
        self.descriptor = descriptor
        self.runPage = run
    }

    var kvmRun: UnsafeMutablePointer<kvm_run> {
        // SAFETY: the mapping is at least sizeof(kvm_run) (KVM_GET_VCPU_MMAP_SIZE) and page-aligned.
        runPage.base.assumingMemoryBound(to: kvm_run.self)
    }

    /// Makes KVM_RUN return `.interrupted` now (if it is running, with the thread's wakeup signal)
    /// or on its next call.
    public func requestExit() {
        // SAFETY: immediate_exit is a byte KVM re-reads on every entry; a racing store is benign.
        withUnsafeMutablePointer(to: &kvmRun.pointee.immediate_exit) { p in
            UnsafeMutableRawPointer(p).storeBytes(of: 1, as: UInt8.self)
        }
    }

    /// Clears a pending `requestExit`.
    public func clearExitRequest() {
        kvmRun.pointee.immediate_exit = 0
    }

    /// Whether an exit has been requested and not cleared.
    public var exitRequested: Bool { kvmRun.pointee.immediate_exit != 0 }

    /// Runs the vCPU until the guest needs the VMM.
    public func run() throws(SwiftletError) -> VCPUExit {
        let result = swiftlet_ioctl_int(descriptor.rawValue, SWIFTLET_KVM_RUN, 0)
        exitCount &+= 1
        if result < 0 {
            let errno = currentErrno
            if errno == .interrupted || errno == .resourceTemporarilyUnavailable { return .interrupted }
            throw SwiftletError.system("KVM_RUN failed on vCPU \(id)", errno: errno)
        }
        let run = kvmRun
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let size = Int(swiftlet_run_io_size(run))
            let count = Int(swiftlet_run_io_count(run))
            // SAFETY: KVM places size*count bytes at data_offset inside the kvm_run mapping.
            let data = UnsafeMutableRawBufferPointer(start: runPage.base + Int(swiftlet_run_io_data_offset(run)), count: size * count)
            return .io(PortIO(port: swiftlet_run_io_port(run), size: size, count: count,
                              isWrite: swiftlet_run_io_direction(run) == UInt8(KVM_EXIT_IO_OUT), data: data))
        case KVM_EXIT_MMIO:
            // SAFETY: mmio.data is an 8-byte array inside kvm_run; len is at most 8.
            let data = UnsafeMutableRawBufferPointer(start: swiftlet_run_mmio_data(run), count: Int(min(8, swiftlet_run_mmio_len(run))))
            return .mmio(MMIOAccess(address: swiftlet_run_mmio_phys_addr(run), isWrite: swiftlet_run_mmio_is_write(run) != 0, data: data))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: swiftlet_run_system_event_type(run))
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(internalError(run))
        case KVM_EXIT_FAIL_ENTRY:
            return .failedEntry(reason: swiftlet_run_fail_entry_reason(run))
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .other(reason: run.pointee.exit_reason)
        }
    }

    private func internalError(_ run: UnsafeMutablePointer<kvm_run>) -> InternalError {
        let suberror = swiftlet_run_internal_suberror(run)
        let ndata = min(16, swiftlet_run_internal_ndata(run))
        let data = (0..<ndata).map { swiftlet_run_internal_data(run, $0) }
        var bytes: [UInt8]?
        if suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION), ndata >= 3,
           swiftlet_run_emulation_flags(run) & UInt64(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
            let size = Int(min(15, swiftlet_run_emulation_insn_size(run)))
            // SAFETY: insn_bytes is a 15-byte array inside kvm_run.
            bytes = Array(UnsafeBufferPointer(start: swiftlet_run_emulation_insn_bytes(run), count: size))
        }
        return InternalError(suberror: suberror, data: data, instructionBytes: bytes)
    }
}

extension VCPU: HypervisorVCPU {}
