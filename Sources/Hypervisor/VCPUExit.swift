/// Why a vCPU's run (KVM_RUN on KVM) returned to the VMM.
///
/// The buffers inside `PortIO` and `MMIOAccess` belong to the vCPU (on KVM, its `kvm_run` page):
/// they are valid only until its next `run()`, on the vCPU's own thread.
public enum VCPUExit {
    /// The guest executed IN or OUT on a port no in-kernel device handles.
    case io(PortIO)
    /// The guest touched a guest-physical address with no memory behind it.
    case mmio(MMIOAccess)
    /// HLT with no in-kernel local APIC to wait in (not seen with the in-kernel irqchip).
    case halt
    /// Triple fault: the vCPU shut down.
    case shutdown
    /// A system event: reset, shutdown or crash requested through a path KVM handles (PSCI, Hyper-V).
    /// `type` is numbered as KVM numbers it (`systemEventShutdown` and so on).
    case systemEvent(type: UInt32)
    /// KVM could not continue; the guest is not runnable as it is.
    case internalError(InternalError)
    /// The hardware refused to enter the guest.
    case failedEntry(reason: UInt64)
    /// KVM_RUN returned early: a signal arrived or an exit was requested.
    case interrupted
    /// An exit reason Swiftlet does not handle.
    case other(reason: UInt32)
}

extension VCPUExit {
    /// `systemEvent` types (KVM_SYSTEM_EVENT_SHUTDOWN, _RESET, _CRASH); later kinds count as a crash.
    public static let systemEventShutdown: UInt32 = 1
    public static let systemEventReset: UInt32 = 2
    public static let systemEventCrash: UInt32 = 3
}

/// A port I/O access. For OUT, `data` holds what the guest wrote; for IN, fill `data`.
/// String I/O (`rep ins/outs`) carries `count` items of `size` bytes back to back.
public struct PortIO {
    public let port: UInt16
    public let size: Int
    public let count: Int
    public let isWrite: Bool
    public let data: UnsafeMutableRawBufferPointer

    public init(port: UInt16, size: Int, count: Int, isWrite: Bool, data: UnsafeMutableRawBufferPointer) {
        self.port = port; self.size = size; self.count = count; self.isWrite = isWrite; self.data = data
    }
}

/// A guest access to unbacked guest-physical memory. For a read, fill `data`.
public struct MMIOAccess {
    public let address: UInt64
    public let isWrite: Bool
    public let data: UnsafeMutableRawBufferPointer

    public init(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer) {
        self.address = address; self.isWrite = isWrite; self.data = data
    }
}

/// KVM_EXIT_INTERNAL_ERROR details.
public struct InternalError: Sendable, Equatable, CustomStringConvertible {
    /// KVM_INTERNAL_ERROR_*: 1 emulation failure, 2 simultaneous exceptions, 3 delivery event, ...
    public var suberror: UInt32
    public var data: [UInt64]
    /// The bytes of the instruction KVM failed to emulate, when KVM reports them.
    public var instructionBytes: [UInt8]?

    public init(suberror: UInt32, data: [UInt64], instructionBytes: [UInt8]?) {
        self.suberror = suberror; self.data = data; self.instructionBytes = instructionBytes
    }

    public var isEmulationFailure: Bool { suberror == 1 }

    public var description: String {
        switch suberror {
        case 1: return "instruction emulation failed"
        case 2: return "simultaneous exceptions"
        case 3: return "event delivery failed"
        case 4: return "unexpected exit reason"
        default: return "internal error \(suberror)"
        }
    }
}
