import SwiftletSystem

/// The CPU features a guest was shown, as far as its memory may depend on them: a guest kernel
/// and its programs look at CPUID once and then use what it offered (AVX-512 registers, RDRAND,
/// an XSAVE layout), so a machine's memory runs on another host only if that host offers at least
/// those features, from the same vendor. A snapshot or pack carries one; `unmet(by:)` says what a
/// host lacks. The TSC frequency the guest calibrated against rides along (a restore on a host
/// with another one scales the guest's TSC where the hypervisor can).
public struct CPUContract: Codable, Sendable, Equatable {
    /// The CPUID vendor string ("GenuineIntel", "AuthenticAMD").
    public var vendor: String
    /// The feature registers, with the bits the guest saw set.
    public var words: [Word]
    /// The guest's TSC frequency, if known.
    public var tscKHz: UInt64?

    /// One feature register of one CPUID leaf.
    public struct Word: Codable, Sendable, Equatable {
        public var function: UInt32
        public var index: UInt32
        public var register: CPUIDRegister
        public var bits: UInt32

        public init(function: UInt32, index: UInt32 = 0, register: CPUIDRegister, bits: UInt32) {
            self.function = function; self.index = index; self.register = register; self.bits = bits
        }

        /// "0x7.0 EBX".
        public var location: String { "0x\(String(function, radix: 16)).\(index) \(register.rawValue.uppercased())" }
    }

    /// The registers that hold features (not identification, sizes or topology), with the bits
    /// in them that the VMM sets whatever the host (hypervisor, TSC deadline and HTT in leaf 1):
    /// those are not host features and are left out.
    public static let featureRegisters: [(function: UInt32, index: UInt32, register: CPUIDRegister, vmmBits: UInt32)] = [
        (0x1, 0, .ecx, 1 << 31 | 1 << 24), (0x1, 0, .edx, 1 << 28),
        (0x7, 0, .ebx, 0), (0x7, 0, .ecx, 0), (0x7, 0, .edx, 0), (0x7, 1, .eax, 0),
        (0xD, 0, .eax, 0), (0xD, 1, .eax, 0),
        (0x8000_0001, 0, .ecx, 0), (0x8000_0001, 0, .edx, 0),
    ]

    public init(vendor: String, words: [Word], tscKHz: UInt64? = nil) {
        self.vendor = vendor; self.words = words; self.tscKHz = tscKHz
    }

    /// The contract of a guest shown `cpuid` (one vCPU's entries; all vCPUs see the same features).
    public init(guest cpuid: [CPUIDEntry], tscKHz: UInt64? = nil) {
        vendor = Self.vendor(of: cpuid)
        words = Self.featureRegisters.compactMap { feature in
            guard let entry = cpuid.entry(feature.function, feature.index) else { return nil }
            let bits = entry[feature.register] & ~feature.vmmBits
            return bits == 0 ? nil : Word(function: feature.function, index: feature.index, register: feature.register, bits: bits)
        }
        self.tscKHz = tscKHz
    }

    /// The vendor string of leaf 0 (EBX, EDX, ECX), "" without one.
    public static func vendor(of cpuid: [CPUIDEntry]) -> String {
        guard let leaf = cpuid.entry(0, 0) else { return "" }
        let bytes = [leaf.ebx, leaf.edx, leaf.ecx].flatMap { word in (0..<4).map { UInt8(truncatingIfNeeded: word >> ($0 * 8)) } }
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// What a host offering `supported` (the hypervisor's supported CPUID) lacks for this
    /// contract, in words for a person (another vendor; each missing feature by name and place);
    /// empty when the host meets it.
    public func unmet(by supported: [CPUIDEntry]) -> [String] {
        let hostVendor = Self.vendor(of: supported)
        if !vendor.isEmpty, !hostVendor.isEmpty, vendor != hostVendor {
            return ["a \(vendor) CPU (this host's is \(hostVendor))"]
        }
        return words.flatMap { word in
            let offered = supported.entry(word.function, word.index)?[word.register] ?? 0
            return CPUFeature.describe(Word(function: word.function, index: word.index, register: word.register, bits: word.bits & ~offered))
        }
    }

    /// The features this contract holds that `template` does not show, by name and place.
    public func features(beyond template: CPUTemplate) -> [String] {
        let shown = template.shownBits
        return words.flatMap { word in
            let allowed = shown[CPUIDRegisterPlace(word.function, word.index, word.register)] ?? 0
            return CPUFeature.describe(Word(function: word.function, index: word.index, register: word.register, bits: word.bits & ~allowed))
        }
    }

    /// Throws, naming what is missing, unless a host offering `supported` meets this contract.
    /// `what` names the machine's memory in the message ("the snapshot in DIR").
    public func check(supported: [CPUIDEntry], what: String) throws(SwiftletError) {
        let unmet = unmet(by: supported)
        guard unmet.isEmpty else {
            throw SwiftletError(.unsupported, "\(what) was running on a CPU with features this host's KVM does not offer: it needs \(unmet.joined(separator: ", ")). Restore it on a host with the same or a newer CPU, or make machines that move with --cpu-template")
        }
    }

    /// How far apart two TSC frequencies may be and count as the same (KVM's own tolerance, in
    /// parts per million, below which it does not scale).
    public static let tscTolerancePPM: UInt64 = 250

    public static func sameTSC(_ a: UInt64, _ b: UInt64) -> Bool {
        let difference = a > b ? a - b : b - a
        return difference <= max(a, b) / (1_000_000 / tscTolerancePPM)
    }

    /// The named features this contract holds (for `pack inspect`), and how many bits have no name here.
    public var featureNames: (names: [String], unnamed: Int) {
        var names: [String] = [], unnamed = 0
        for word in words {
            for bit in 0..<32 where word.bits >> bit & 1 != 0 {
                if let feature = CPUFeature.named(word.function, word.index, word.register, UInt32(bit)) { names.append(feature.name) } else { unnamed += 1 }
            }
        }
        return (names, unnamed)
    }
}

/// A CPUID register.
public enum CPUIDRegister: String, Codable, Sendable, Hashable {
    case eax, ebx, ecx, edx
}

/// One register of one CPUID leaf and subleaf.
public struct CPUIDRegisterPlace: Sendable, Hashable {
    public var function: UInt32, index: UInt32, register: CPUIDRegister

    public init(_ function: UInt32, _ index: UInt32, _ register: CPUIDRegister) {
        self.function = function; self.index = index; self.register = register
    }
}

extension CPUIDEntry {
    public subscript(register: CPUIDRegister) -> UInt32 {
        get {
            switch register {
            case .eax: return eax
            case .ebx: return ebx
            case .ecx: return ecx
            case .edx: return edx
            }
        }
        set {
            switch register {
            case .eax: eax = newValue
            case .ebx: ebx = newValue
            case .ecx: ecx = newValue
            case .edx: edx = newValue
            }
        }
    }
}

extension Array where Element == CPUIDEntry {
    /// The entry for leaf `function`, subleaf `index`.
    public func entry(_ function: UInt32, _ index: UInt32) -> CPUIDEntry? {
        first { $0.function == function && $0.index == index }
    }
}

/// A CPU feature by its Linux /proc/cpuinfo name and its CPUID bit, for messages and templates.
public struct CPUFeature: Sendable, Hashable {
    public var name: String
    public var function: UInt32
    public var index: UInt32
    public var register: CPUIDRegister
    public var bit: UInt32

    init(_ name: String, _ function: UInt32, _ index: UInt32, _ register: CPUIDRegister, _ bit: UInt32) {
        self.name = name; self.function = function; self.index = index; self.register = register; self.bit = bit
    }

    /// The features Swiftlet knows by name: those of the x86-64 psABI levels and templates, and
    /// the common ones a guest's software checks for.
    public static let known: [CPUFeature] = [
        // Leaf 1 EDX.
        .init("fpu", 1, 0, .edx, 0), .init("vme", 1, 0, .edx, 1), .init("de", 1, 0, .edx, 2), .init("pse", 1, 0, .edx, 3),
        .init("tsc", 1, 0, .edx, 4), .init("msr", 1, 0, .edx, 5), .init("pae", 1, 0, .edx, 6), .init("mce", 1, 0, .edx, 7),
        .init("cx8", 1, 0, .edx, 8), .init("apic", 1, 0, .edx, 9), .init("sep", 1, 0, .edx, 11), .init("mtrr", 1, 0, .edx, 12),
        .init("pge", 1, 0, .edx, 13), .init("mca", 1, 0, .edx, 14), .init("cmov", 1, 0, .edx, 15), .init("pat", 1, 0, .edx, 16),
        .init("pse36", 1, 0, .edx, 17), .init("clflush", 1, 0, .edx, 19), .init("mmx", 1, 0, .edx, 23), .init("fxsr", 1, 0, .edx, 24),
        .init("sse", 1, 0, .edx, 25), .init("sse2", 1, 0, .edx, 26),
        // Leaf 1 ECX.
        .init("pni", 1, 0, .ecx, 0), .init("pclmulqdq", 1, 0, .ecx, 1), .init("ssse3", 1, 0, .ecx, 9), .init("fma", 1, 0, .ecx, 12),
        .init("cx16", 1, 0, .ecx, 13), .init("pcid", 1, 0, .ecx, 17), .init("sse4_1", 1, 0, .ecx, 19), .init("sse4_2", 1, 0, .ecx, 20),
        .init("x2apic", 1, 0, .ecx, 21), .init("movbe", 1, 0, .ecx, 22), .init("popcnt", 1, 0, .ecx, 23), .init("aes", 1, 0, .ecx, 25),
        .init("xsave", 1, 0, .ecx, 26), .init("avx", 1, 0, .ecx, 28), .init("f16c", 1, 0, .ecx, 29), .init("rdrand", 1, 0, .ecx, 30),
        // Leaf 7 EBX, ECX, EDX.
        .init("fsgsbase", 7, 0, .ebx, 0), .init("bmi1", 7, 0, .ebx, 3), .init("hle", 7, 0, .ebx, 4), .init("avx2", 7, 0, .ebx, 5),
        .init("smep", 7, 0, .ebx, 7), .init("bmi2", 7, 0, .ebx, 8), .init("erms", 7, 0, .ebx, 9), .init("invpcid", 7, 0, .ebx, 10),
        .init("rtm", 7, 0, .ebx, 11), .init("avx512f", 7, 0, .ebx, 16), .init("avx512dq", 7, 0, .ebx, 17), .init("rdseed", 7, 0, .ebx, 18),
        .init("adx", 7, 0, .ebx, 19), .init("smap", 7, 0, .ebx, 20), .init("avx512ifma", 7, 0, .ebx, 21),
        .init("clflushopt", 7, 0, .ebx, 23), .init("clwb", 7, 0, .ebx, 24), .init("avx512cd", 7, 0, .ebx, 28),
        .init("sha_ni", 7, 0, .ebx, 29), .init("avx512bw", 7, 0, .ebx, 30), .init("avx512vl", 7, 0, .ebx, 31),
        .init("avx512vbmi", 7, 0, .ecx, 1), .init("umip", 7, 0, .ecx, 2), .init("pku", 7, 0, .ecx, 3),
        .init("avx512_vbmi2", 7, 0, .ecx, 6), .init("gfni", 7, 0, .ecx, 8), .init("vaes", 7, 0, .ecx, 9),
        .init("vpclmulqdq", 7, 0, .ecx, 10), .init("avx512_vnni", 7, 0, .ecx, 11), .init("avx512_bitalg", 7, 0, .ecx, 12),
        .init("avx512_vpopcntdq", 7, 0, .ecx, 14), .init("rdpid", 7, 0, .ecx, 22),
        .init("fsrm", 7, 0, .edx, 4), .init("serialize", 7, 0, .edx, 14), .init("amx_bf16", 7, 0, .edx, 22),
        .init("amx_tile", 7, 0, .edx, 24), .init("amx_int8", 7, 0, .edx, 25),
        .init("avx_vnni", 7, 1, .eax, 4), .init("avx512_bf16", 7, 1, .eax, 5),
        // XSAVE state components (leaf 0xD.0 EAX) and instructions (0xD.1 EAX).
        .init("xstate:x87", 0xD, 0, .eax, 0), .init("xstate:sse", 0xD, 0, .eax, 1), .init("xstate:avx", 0xD, 0, .eax, 2),
        .init("xstate:mpx-bounds", 0xD, 0, .eax, 3), .init("xstate:mpx-csr", 0xD, 0, .eax, 4),
        .init("xstate:avx512-opmask", 0xD, 0, .eax, 5), .init("xstate:avx512-zmm-hi256", 0xD, 0, .eax, 6),
        .init("xstate:avx512-hi16-zmm", 0xD, 0, .eax, 7), .init("xstate:pkru", 0xD, 0, .eax, 9),
        .init("xstate:amx-tilecfg", 0xD, 0, .eax, 17), .init("xstate:amx-tiledata", 0xD, 0, .eax, 18),
        .init("xsaveopt", 0xD, 1, .eax, 0), .init("xsavec", 0xD, 1, .eax, 1), .init("xgetbv1", 0xD, 1, .eax, 2),
        .init("xsaves", 0xD, 1, .eax, 3),
        // Leaf 0x8000_0001 ECX, EDX.
        .init("lahf_lm", 0x8000_0001, 0, .ecx, 0), .init("svm", 0x8000_0001, 0, .ecx, 2), .init("abm", 0x8000_0001, 0, .ecx, 5),
        .init("sse4a", 0x8000_0001, 0, .ecx, 6), .init("misalignsse", 0x8000_0001, 0, .ecx, 7),
        .init("3dnowprefetch", 0x8000_0001, 0, .ecx, 8), .init("xop", 0x8000_0001, 0, .ecx, 11),
        .init("fma4", 0x8000_0001, 0, .ecx, 16), .init("tbm", 0x8000_0001, 0, .ecx, 21),
        .init("syscall", 0x8000_0001, 0, .edx, 11), .init("nx", 0x8000_0001, 0, .edx, 20), .init("mmxext", 0x8000_0001, 0, .edx, 22),
        .init("fxsr_opt", 0x8000_0001, 0, .edx, 25), .init("pdpe1gb", 0x8000_0001, 0, .edx, 26), .init("rdtscp", 0x8000_0001, 0, .edx, 27),
        .init("lm", 0x8000_0001, 0, .edx, 29),
    ]

    private static let byPlace: [Place: CPUFeature] = Dictionary(known.map { (Place($0.function, $0.index, $0.register, $0.bit), $0) }, uniquingKeysWith: { first, _ in first })
    private static let byName: [String: CPUFeature] = Dictionary(known.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })

    private struct Place: Hashable {
        var function: UInt32, index: UInt32, register: CPUIDRegister, bit: UInt32
        init(_ function: UInt32, _ index: UInt32, _ register: CPUIDRegister, _ bit: UInt32) {
            self.function = function; self.index = index; self.register = register; self.bit = bit
        }
    }

    public static func named(_ function: UInt32, _ index: UInt32, _ register: CPUIDRegister, _ bit: UInt32) -> CPUFeature? {
        byPlace[Place(function, index, register, bit)]
    }

    public static func named(_ name: String) -> CPUFeature? { byName[name] }

    /// Each set bit of `word` in words: "avx512f (CPUID 0x7.0 EBX bit 16)", "CPUID 0x7.0 EDX bit 31".
    static func describe(_ word: CPUContract.Word) -> [String] {
        (0..<32).filter { word.bits >> $0 & 1 != 0 }.map { bit in
            let place = "CPUID \(word.location) bit \(bit)"
            guard let feature = named(word.function, word.index, word.register, UInt32(bit)) else { return place }
            return "\(feature.name) (\(place))"
        }
    }
}
