import CLinux
import Glibc
import Hypervisor
import SwiftletSystem

extension VCPU {
    func ioctl(_ name: @autoclosure () -> String, _ request: UInt, _ arg: UnsafeMutableRawPointer) throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("\(name()) failed on vCPU \(id)") { swiftlet_ioctl_ptr(fd, request, arg) }
    }

    /// Reads a fixed-size KVM state struct with `request`.
    func get<T>(_ type: T.Type, _ name: String, _ request: UInt, initial: T) throws(SwiftletError) -> T {
        var value = initial
        try ioctl(name, request, &value)
        return value
    }

    public func registers() throws(SwiftletError) -> Registers {
        Registers(try get(kvm_regs.self, "KVM_GET_REGS", SWIFTLET_KVM_GET_REGS, initial: kvm_regs()))
    }

    public func setRegisters(_ registers: Registers) throws(SwiftletError) {
        var k = registers.kvm
        try ioctl("KVM_SET_REGS", SWIFTLET_KVM_SET_REGS, &k)
    }

    public func specialRegisters() throws(SwiftletError) -> SpecialRegisters {
        SpecialRegisters(try get(kvm_sregs.self, "KVM_GET_SREGS", SWIFTLET_KVM_GET_SREGS, initial: kvm_sregs()))
    }

    public func setSpecialRegisters(_ registers: SpecialRegisters) throws(SwiftletError) {
        var k = registers.kvm
        try ioctl("KVM_SET_SREGS", SWIFTLET_KVM_SET_SREGS, &k)
    }

    public func fpu() throws(SwiftletError) -> FPUState {
        FPUState(try get(kvm_fpu.self, "KVM_GET_FPU", SWIFTLET_KVM_GET_FPU, initial: kvm_fpu()))
    }

    public func setFPU(_ state: FPUState) throws(SwiftletError) {
        var k = state.kvm
        try ioctl("KVM_SET_FPU", SWIFTLET_KVM_SET_FPU, &k)
    }

    /// Sets the CPUID leaves the guest sees on this vCPU.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(SwiftletError) {
        try withCPUIDBuffer(capacity: entries.count) { buffer, header throws(SwiftletError) in
            for (i, entry) in entries.enumerated() { buffer[i] = entry.kvm }
            try ioctl("KVM_SET_CPUID2", SWIFTLET_KVM_SET_CPUID2, header)
        }
    }

    /// Reads `indices`; returns the MSRs KVM could read (it stops at the first it cannot).
    public func msrs(_ indices: [UInt32]) throws(SwiftletError) -> [MSREntry] {
        guard !indices.isEmpty else { return [] }
        return try withMSRBuffer(count: indices.count) { header, entries throws(SwiftletError) -> [MSREntry] in
            for (i, index) in indices.enumerated() { entries[i].index = index }
            let fd = descriptor.rawValue
            let n = try systemCall("KVM_GET_MSRS failed on vCPU \(id)") { swiftlet_ioctl_ptr(fd, SWIFTLET_KVM_GET_MSRS, header) }
            return entries.prefix(Int(n)).map { MSREntry(index: $0.index, value: $0.data) }
        }
    }

    /// Writes `entries`, failing unless KVM accepted every one.
    public func setMSRs(_ entries: [MSREntry]) throws(SwiftletError) {
        guard !entries.isEmpty else { return }
        try withMSRBuffer(count: entries.count) { header, buffer throws(SwiftletError) in
            for (i, entry) in entries.enumerated() {
                buffer[i].index = entry.index
                buffer[i].data = entry.value
            }
            let fd = descriptor.rawValue
            let n = try systemCall("KVM_SET_MSRS failed on vCPU \(id)") { swiftlet_ioctl_ptr(fd, SWIFTLET_KVM_SET_MSRS, header) }
            guard Int(n) == entries.count else {
                let rejected = entries[Int(n)].index
                throw SwiftletError(.unsupported, "KVM rejected MSR 0x\(String(rejected, radix: 16)) on vCPU \(id)")
            }
        }
    }

    private func withMSRBuffer<R>(count: Int, _ body: (UnsafeMutablePointer<kvm_msrs>, UnsafeMutableBufferPointer<kvm_msr_entry>) throws(SwiftletError) -> R) throws(SwiftletError) -> R {
        let headerSize = MemoryLayout<kvm_msrs>.size
        let total = headerSize + count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: total)
        // SAFETY: the allocation holds the header followed by `count` entries, as nmsrs tells KVM.
        let header = raw.bindMemory(to: kvm_msrs.self, capacity: 1)
        header.pointee.nmsrs = UInt32(count)
        let entries = (raw + headerSize).bindMemory(to: kvm_msr_entry.self, capacity: count)
        return try body(header, UnsafeMutableBufferPointer(start: entries, count: count))
    }

    /// The guest's TSC frequency in kHz (KVM_GET_TSC_KHZ).
    public func tscKHz() throws(SwiftletError) -> UInt64 {
        let fd = descriptor.rawValue
        return UInt64(try systemCall("KVM_GET_TSC_KHZ failed on vCPU \(id)") { swiftlet_ioctl_int(fd, SWIFTLET_KVM_GET_TSC_KHZ, 0) })
    }

    /// Sets the guest's TSC frequency (KVM_SET_TSC_KHZ).
    public func setTSCKHz(_ khz: UInt64) throws(SwiftletError) {
        let fd = descriptor.rawValue
        guard khz > 0, khz <= UInt64(UInt32.max) else {
            throw SwiftletError(.invalidArgument, "a TSC frequency of \(khz) kHz is out of range")
        }
        _ = try systemCall("KVM_SET_TSC_KHZ (\(khz) kHz) failed on vCPU \(id)") { swiftlet_ioctl_int(fd, SWIFTLET_KVM_SET_TSC_KHZ, UInt(khz)) }
    }

    public func mpState() throws(SwiftletError) -> MPState {
        let k = try get(kvm_mp_state.self, "KVM_GET_MP_STATE", SWIFTLET_KVM_GET_MP_STATE, initial: kvm_mp_state())
        return MPState(rawValue: k.mp_state) ?? .runnable
    }

    public func setMPState(_ state: MPState) throws(SwiftletError) {
        var k = kvm_mp_state(mp_state: state.rawValue)
        try ioctl("KVM_SET_MP_STATE", SWIFTLET_KVM_SET_MP_STATE, &k)
    }

    /// The local APIC's 1 KiB register page.
    public func localAPIC() throws(SwiftletError) -> [UInt8] {
        var k = kvm_lapic_state()
        try ioctl("KVM_GET_LAPIC", SWIFTLET_KVM_GET_LAPIC, &k)
        return withUnsafeBytes(of: k.regs) { Array($0) }
    }

    public func setLocalAPIC(_ registers: [UInt8]) throws(SwiftletError) {
        var k = kvm_lapic_state()
        guard registers.count == MemoryLayout.size(ofValue: k.regs) else {
            throw SwiftletError(.invalidFormat, "local APIC state must be \(MemoryLayout.size(ofValue: k.regs)) bytes, got \(registers.count)")
        }
        withUnsafeMutableBytes(of: &k.regs) { $0.copyBytes(from: registers) }
        try ioctl("KVM_SET_LAPIC", SWIFTLET_KVM_SET_LAPIC, &k)
    }

    /// Guest-virtual to guest-physical translation through the vCPU's current page tables.
    public func translate(_ virtualAddress: UInt64) throws(SwiftletError) -> UInt64? {
        var t = kvm_translation()
        t.linear_address = virtualAddress
        try ioctl("KVM_TRANSLATE", SWIFTLET_KVM_TRANSLATE, &t)
        return t.valid != 0 ? t.physical_address : nil
    }
}
