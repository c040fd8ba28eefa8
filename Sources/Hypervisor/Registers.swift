import SwiftletSystem

/// General-purpose registers of an x86_64 vCPU (what KVM_GET_REGS reads).
public struct Registers: Codable, Sendable, Equatable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 is reserved and always set.
    public var rflags: UInt64 = 0x2

    public init() {}
}

/// A segment register as KVM describes it (the hidden descriptor cache included).
public struct Segment: Codable, Sendable, Equatable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0xFFFF
    public var selector: UInt16 = 0
    public var type: UInt8 = 0
    public var present: Bool = false
    public var dpl: UInt8 = 0
    /// Default operation size (32-bit) bit.
    public var db: Bool = false
    /// Code/data (true) or system (false) descriptor.
    public var s: Bool = false
    /// 64-bit code segment.
    public var l: Bool = false
    /// Limit granularity is 4 KiB.
    public var g: Bool = false
    public var avl: Bool = false
    public var unusable: Bool = false

    public init(base: UInt64 = 0, limit: UInt32 = 0xFFFF, selector: UInt16 = 0, type: UInt8 = 0, present: Bool = false,
                dpl: UInt8 = 0, db: Bool = false, s: Bool = false, l: Bool = false, g: Bool = false,
                avl: Bool = false, unusable: Bool = false) {
        self.base = base; self.limit = limit; self.selector = selector; self.type = type; self.present = present
        self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g; self.avl = avl; self.unusable = unusable
    }
}

/// A descriptor table register (GDTR or IDTR).
public struct DescriptorTable: Codable, Sendable, Equatable {
    public var base: UInt64 = 0
    public var limit: UInt16 = 0
    public init(base: UInt64 = 0, limit: UInt16 = 0) { self.base = base; self.limit = limit }
}

/// Segment, control and system registers of an x86_64 vCPU (what KVM_GET_SREGS reads).
public struct SpecialRegisters: Codable, Sendable, Equatable {
    public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment(), gs = Segment(), ss = Segment()
    public var tr = Segment(), ldt = Segment()
    public var gdt = DescriptorTable(), idt = DescriptorTable()
    public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0
    public var apicBase: UInt64 = 0
    /// Pending external interrupt bitmap (256 bits).
    public var interruptBitmap: [UInt64] = [0, 0, 0, 0]

    public init() {}
}

/// One model-specific register and its value.
public struct MSREntry: Codable, Sendable, Equatable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// One CPUID leaf as KVM stores it.
public struct CPUIDEntry: Codable, Sendable, Equatable {
    public var function: UInt32
    public var index: UInt32
    /// KVM_CPUID_FLAG_* (significant index and so on).
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// Multiprocessing state of a vCPU (KVM_MP_STATE_*).
public enum MPState: UInt32, Codable, Sendable {
    case runnable = 0
    case uninitialized = 1
    case initReceived = 2
    case halted = 3
    case sipiReceived = 4
}

/// Legacy FPU and SSE state (KVM_GET_FPU); the full extended state is in `VCPUState.xsave`.
public struct FPUState: Codable, Sendable, Equatable {
    /// x87 control word; 0x37F after FNINIT.
    public var fcw: UInt16 = 0x37F
    public var fsw: UInt16 = 0
    public var ftwx: UInt8 = 0
    public var lastOpcode: UInt16 = 0
    public var lastIP: UInt64 = 0
    public var lastDP: UInt64 = 0
    /// SSE control/status; 0x1F80 at reset.
    public var mxcsr: UInt32 = 0x1F80
    /// The eight x87 registers then the sixteen XMM registers, 16 bytes each.
    @HexBytes public var registers: [UInt8] = Array(repeating: 0, count: 24 * 16)

    public init() {}
}
