/// A named CPU baseline a machine can be made with (`--cpu-template`): its guest is shown exactly
/// the template's features, whatever more the host has, so its memory (a snapshot, a pack) runs on
/// any host of the same vendor that has the template's features, across CPU generations.
///
/// The baselines are the x86-64 psABI microarchitecture levels (v2: Nehalem and later, Jaguar
/// and later; v3: Haswell and later, Zen and later; v4: Skylake-SP and later, Zen 4 and later),
/// with the platform features every x86-64 host has (the x87, MMX and SSE units, PAE, APIC and
/// x2APIC, SYSCALL, NX, long mode) and, from v3 on, the supervisor features of those generations
/// (FSGSBASE, SMEP, XSAVEOPT; from v4, SMAP).
public enum CPUTemplate: String, Codable, Sendable, CaseIterable {
    case x86_64_v2 = "x86-64-v2"
    case x86_64_v3 = "x86-64-v3"
    case x86_64_v4 = "x86-64-v4"

    /// The template `name` names; nil for an unknown one.
    public init?(named name: String) { self.init(rawValue: name) }

    /// VME (virtual-8086 mode extensions) is left out: a 64-bit guest has no use for it, and
    /// some virtualized hosts' KVM does not offer it.
    static let platform = [
        "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "x2apic", "syscall", "nx", "lm",
    ]
    static let v2 = ["cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"]
    static let v3 = ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
                     "xstate:x87", "xstate:sse", "xstate:avx", "xsaveopt", "fsgsbase", "smep"]
    static let v4 = ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                     "xstate:avx512-opmask", "xstate:avx512-zmm-hi256", "xstate:avx512-hi16-zmm", "smap"]

    /// The features a guest of this template sees (and a host must have).
    public var features: [CPUFeature] {
        let names: [String]
        switch self {
        case .x86_64_v2: names = Self.platform + Self.v2
        case .x86_64_v3: names = Self.platform + Self.v2 + Self.v3
        case .x86_64_v4: names = Self.platform + Self.v2 + Self.v3 + Self.v4
        }
        return names.map { name in
            guard let feature = CPUFeature.named(name) else { preconditionFailure("template feature \(name) has no CPUID bit") }
            return feature
        }
    }

    /// The bits this template shows in each feature register (registers it shows nothing of
    /// are absent).
    public var shownBits: [CPUIDRegisterPlace: UInt32] {
        var shown: [CPUIDRegisterPlace: UInt32] = [:]
        for feature in features { shown[CPUIDRegisterPlace(feature.function, feature.index, feature.register), default: 0] |= 1 << feature.bit }
        return shown
    }

    /// The features of this template a host offering `supported` lacks, by name.
    public func missing(from supported: [CPUIDEntry]) -> [String] {
        features.filter { feature in
            (supported.entry(feature.function, feature.index)?[feature.register] ?? 0) >> feature.bit & 1 == 0
        }.map(\.name)
    }

    /// `entries` (one vCPU's CPUID, as the VMM shaped it) with every feature register cut down to
    /// this template's features (the bits the VMM sets itself kept), and the XSAVE leaf cut down
    /// to the state components the template shows: no component, size or supervisor state of
    /// one it hides.
    public func apply(to entries: [CPUIDEntry]) -> [CPUIDEntry] {
        let shown = shownBits
        let components = shown[CPUIDRegisterPlace(0xD, 0, .eax)] ?? 0
        return entries.map { entry in
            var e = entry
            for register in CPUContract.featureRegisters where register.function == e.function && register.index == e.index {
                e[register.register] &= (shown[CPUIDRegisterPlace(e.function, e.index, register.register)] ?? 0) | register.vmmBits
            }
            if e.function == 0xD {
                switch e.index {
                case 0: e.edx = 0  // XCR0's upper half: no component there is in a template.
                case 1: e.ecx = 0; e.edx = 0  // IA32_XSS: supervisor states go with XSAVES, which no template shows.
                default:
                    if e.index >= 32 || components >> e.index & 1 == 0 { e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0 }
                }
            }
            return e
        }
    }
}
