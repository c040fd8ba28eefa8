import SwiftletSystem
import CLinux

/// General-purpose registers of an x86_64 vCPU (KVM_GET_REGS).
public struct Registers: Codable, Sendable, Equatable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 is reserved and always set.
    public var rflags: UInt64 = 0x2

    public init() {}

    init(_ r: kvm_regs) {
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kvm: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }
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

    init(_ k: kvm_segment) {
        base = k.base; limit = k.limit; selector = k.selector; type = k.type; present = k.present != 0
        dpl = k.dpl; db = k.db != 0; s = k.s != 0; l = k.l != 0; g = k.g != 0; avl = k.avl != 0
        unusable = k.unusable != 0
    }

    var kvm: kvm_segment {
        kvm_segment(base: base, limit: limit, selector: selector, type: type, present: present ? 1 : 0, dpl: dpl,
                    db: db ? 1 : 0, s: s ? 1 : 0, l: l ? 1 : 0, g: g ? 1 : 0, avl: avl ? 1 : 0,
                    unusable: unusable ? 1 : 0, padding: 0)
    }
}

/// A descriptor table register (GDTR or IDTR).
public struct DescriptorTable: Codable, Sendable, Equatable {
    public var base: UInt64 = 0
    public var limit: UInt16 = 0
    public init(base: UInt64 = 0, limit: UInt16 = 0) { self.base = base; self.limit = limit }
}

/// Segment, control and system registers of an x86_64 vCPU (KVM_GET_SREGS).
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

    init(_ k: kvm_sregs) {
        cs = Segment(k.cs); ds = Segment(k.ds); es = Segment(k.es); fs = Segment(k.fs); gs = Segment(k.gs)
        ss = Segment(k.ss); tr = Segment(k.tr); ldt = Segment(k.ldt)
        gdt = DescriptorTable(base: k.gdt.base, limit: k.gdt.limit)
        idt = DescriptorTable(base: k.idt.base, limit: k.idt.limit)
        cr0 = k.cr0; cr2 = k.cr2; cr3 = k.cr3; cr4 = k.cr4; cr8 = k.cr8; efer = k.efer; apicBase = k.apic_base
        interruptBitmap = [k.interrupt_bitmap.0, k.interrupt_bitmap.1, k.interrupt_bitmap.2, k.interrupt_bitmap.3]
    }

    var kvm: kvm_sregs {
        var k = kvm_sregs()
        k.cs = cs.kvm; k.ds = ds.kvm; k.es = es.kvm; k.fs = fs.kvm; k.gs = gs.kvm; k.ss = ss.kvm
        k.tr = tr.kvm; k.ldt = ldt.kvm
        k.gdt.base = gdt.base; k.gdt.limit = gdt.limit
        k.idt.base = idt.base; k.idt.limit = idt.limit
        k.cr0 = cr0; k.cr2 = cr2; k.cr3 = cr3; k.cr4 = cr4; k.cr8 = cr8; k.efer = efer; k.apic_base = apicBase
        let b = interruptBitmap + [0, 0, 0, 0]
        k.interrupt_bitmap = (b[0], b[1], b[2], b[3])
        return k
    }
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

    init(_ k: kvm_cpuid_entry2) {
        self.init(function: k.function, index: k.index, flags: k.flags, eax: k.eax, ebx: k.ebx, ecx: k.ecx, edx: k.edx)
    }

    var kvm: kvm_cpuid_entry2 {
        var k = kvm_cpuid_entry2()
        k.function = function; k.index = index; k.flags = flags
        k.eax = eax; k.ebx = ebx; k.ecx = ecx; k.edx = edx
        return k
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

    init(_ k: kvm_fpu) {
        fcw = k.fcw; fsw = k.fsw; ftwx = k.ftwx; lastOpcode = k.last_opcode; lastIP = k.last_ip; lastDP = k.last_dp
        mxcsr = k.mxcsr
        var bytes: [UInt8] = []
        withUnsafeBytes(of: k.fpr) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: k.xmm) { bytes.append(contentsOf: $0) }
        registers = bytes
    }

    var kvm: kvm_fpu {
        var k = kvm_fpu()
        k.fcw = fcw; k.fsw = fsw; k.ftwx = ftwx; k.last_opcode = lastOpcode; k.last_ip = lastIP; k.last_dp = lastDP
        k.mxcsr = mxcsr
        let fprSize = MemoryLayout.size(ofValue: k.fpr)
        withUnsafeMutableBytes(of: &k.fpr) { $0.copyBytes(from: registers.prefix(fprSize)) }
        withUnsafeMutableBytes(of: &k.xmm) { $0.copyBytes(from: registers.dropFirst(fprSize).prefix($0.count)) }
        return k
    }
}
