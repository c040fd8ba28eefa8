import CLinux
import Hypervisor

// Converters between the architectural values of the Hypervisor target and KVM's own structs.

extension Registers {
    init(_ r: kvm_regs) {
        self.init()
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

extension Segment {
    init(_ k: kvm_segment) {
        self.init(base: k.base, limit: k.limit, selector: k.selector, type: k.type, present: k.present != 0,
                  dpl: k.dpl, db: k.db != 0, s: k.s != 0, l: k.l != 0, g: k.g != 0, avl: k.avl != 0,
                  unusable: k.unusable != 0)
    }

    var kvm: kvm_segment {
        kvm_segment(base: base, limit: limit, selector: selector, type: type, present: present ? 1 : 0, dpl: dpl,
                    db: db ? 1 : 0, s: s ? 1 : 0, l: l ? 1 : 0, g: g ? 1 : 0, avl: avl ? 1 : 0,
                    unusable: unusable ? 1 : 0, padding: 0)
    }
}

extension SpecialRegisters {
    init(_ k: kvm_sregs) {
        self.init()
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

extension CPUIDEntry {
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

extension FPUState {
    init(_ k: kvm_fpu) {
        self.init()
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
