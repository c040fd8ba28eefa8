import Hypervisor

/// Shapes the CPUID KVM supports into what each vCPU of an N-CPU machine should see: its APIC ID,
/// one socket of N single-thread cores, the hypervisor bit, the TSC-deadline timer, no PMU.
public enum CPUIDSetup {
    static let leaf1HypervisorBit: UInt32 = 1 << 31
    static let leaf1TSCDeadlineBit: UInt32 = 1 << 24
    static let leaf1HTTBit: UInt32 = 1 << 28

    /// CPUID for vCPU `cpu` of `count`, from `supported` (KVM_GET_SUPPORTED_CPUID).
    public static func entries(from supported: [CPUIDEntry], cpu: UInt32, count: Int, tscDeadline: Bool) -> [CPUIDEntry] {
        let apicID = cpu
        let coreBits = UInt32(count > 1 ? (Int.bitWidth - (count - 1).leadingZeroBitCount) : 0)
        return supported.map { entry in
            var e = entry
            switch e.function {
            case 0x1:
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package, [15:8] CLFLUSH size.
                e.ebx = (apicID << 24) | (UInt32(min(count, 255)) << 16) | (e.ebx & 0xFFFF)
                e.ecx |= leaf1HypervisorBit
                if tscDeadline { e.ecx |= leaf1TSCDeadlineBit }
                if count > 1 { e.edx |= leaf1HTTBit } else { e.edx &= ~leaf1HTTBit }
            case 0x4:
                // Deterministic cache parameters: cores per package - 1 in EAX[31:26]; caches are
                // shared by one thread (EAX[25:14] = 0) in this topology.
                e.eax = (e.eax & 0x3FFF) | (UInt32(min(count, 64) - 1) << 26)
            case 0xA:
                // No architectural PMU: keeps guests from probing performance counters.
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            case 0xB, 0x1F:
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (count cores).
                switch e.index {
                case 0:
                    e.eax = 0; e.ebx = 1; e.ecx = (1 << 8) | 0
                case 1:
                    e.eax = coreBits; e.ebx = UInt32(count); e.ecx = (2 << 8) | 1
                default:
                    e.eax = 0; e.ebx = 0; e.ecx = e.index
                }
                e.edx = apicID
            case 0x8000_0008:
                // AMD: ECX[7:0] cores per package - 1, [15:12] APIC ID bits for the core.
                e.ecx = (e.ecx & ~0xF0FF) | (coreBits << 12) | UInt32(min(count, 256) - 1)
            case 0x8000_001E:
                // AMD: extended APIC ID, core ID, one thread per core.
                e.eax = apicID
                e.ebx = cpu & 0xFF
                e.ecx = 0
            default:
                break
            }
            return e
        }
    }
}
