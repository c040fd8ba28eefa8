import Hypervisor
import LinuxBoot
import SwiftletSystem

/// Puts a vCPU in the state Linux's 64-bit boot protocol expects (boot CPU) or leaves it waiting
/// for INIT/SIPI (application processors), with MSRs, FPU and local APIC as a PC BIOS would leave them.
enum VCPUBootSetup {
    static let msrIA32TSC: UInt32 = 0x10
    static let msrIA32MiscEnable: UInt32 = 0x1A0
    static let msrMTRRDefType: UInt32 = 0x2FF
    static let miscEnableFastStrings: UInt64 = 1
    /// MTRRs enabled, default memory type write-back.
    static let mtrrDefaultWriteBack: UInt64 = (1 << 11) | 6

    /// Local APIC register offsets and LVT delivery modes.
    static let apicLINT0 = 0x350
    static let apicLINT1 = 0x360
    static let deliveryExtINT: UInt32 = 7 << 8
    static let deliveryNMI: UInt32 = 4 << 8

    static func configure(_ vcpu: any HypervisorVCPU, cpuid: [CPUIDEntry], supportedMSRs: Set<UInt32>, boot: BootCPUState?) throws(SwiftletError) {
        try vcpu.setCPUID(cpuid)

        var msrs = [MSREntry(index: msrIA32TSC, value: 0)]
        if supportedMSRs.contains(msrIA32MiscEnable) { msrs.append(MSREntry(index: msrIA32MiscEnable, value: miscEnableFastStrings)) }
        if supportedMSRs.contains(msrMTRRDefType) { msrs.append(MSREntry(index: msrMTRRDefType, value: mtrrDefaultWriteBack)) }
        try vcpu.setMSRs(msrs)

        // LINT0 delivers the (legacy) external interrupt, LINT1 NMIs, as the MP spec's virtual-wire mode.
        var lapic = try vcpu.localAPIC()
        setAPICRegister(&lapic, apicLINT0, (readAPICRegister(lapic, apicLINT0) & ~0x700) | deliveryExtINT)
        setAPICRegister(&lapic, apicLINT1, (readAPICRegister(lapic, apicLINT1) & ~0x700) | deliveryNMI)
        try vcpu.setLocalAPIC(lapic)

        var fpu = FPUState()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        try vcpu.setFPU(fpu)

        guard let boot else { return } // APs stay in wait-for-SIPI; KVM's local APIC starts them.
        var sregs = try vcpu.specialRegisters()
        sregs.gdt = DescriptorTable(base: boot.gdtBase, limit: boot.gdtLimit)
        sregs.idt = DescriptorTable(base: boot.idtBase, limit: boot.idtLimit)
        let code = segment(boot.code, selector: boot.codeSelector)
        let data = segment(boot.data, selector: boot.dataSelector)
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = segment(boot.tss, selector: boot.tssSelector)
        sregs.cr0 = boot.cr0
        sregs.cr3 = boot.cr3
        sregs.cr4 = boot.cr4
        sregs.efer = boot.efer
        try vcpu.setSpecialRegisters(sregs)

        var regs = Registers()
        regs.rip = boot.rip
        regs.rsp = boot.rsp
        regs.rbp = boot.rsp
        regs.rsi = boot.rsi
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
    }

    /// KVM's view of a GDT descriptor loaded into a segment register.
    static func segment(_ d: SegmentDescriptor, selector: UInt16) -> Segment {
        Segment(base: UInt64(d.base), limit: d.byteLimit, selector: selector, type: d.type, present: d.present, dpl: d.dpl,
                db: d.defaultSize32, s: d.isCodeOrData, l: d.longMode, g: d.granularity4K, avl: false, unusable: !d.present)
    }

    static func readAPICRegister(_ page: [UInt8], _ offset: Int) -> UInt32 {
        UInt32(LittleEndian.read(page, at: offset, count: 4))
    }

    static func setAPICRegister(_ page: inout [UInt8], _ offset: Int, _ value: UInt32) {
        LittleEndian.write(UInt64(value), 4, into: &page, at: offset)
    }
}
