import Hypervisor
import SwiftletSystem
import Testing
@testable import VMM

/// The CPU a machine's memory depends on (`CPUContract`), the baselines a machine can be made
/// with (`CPUTemplate`), and the TSC frequency a restore matches: plain values over CPUID
/// leaves, checked here against made-up hosts.
@Suite struct CPUContractTests {
    /// The leaf-0 entry of a CPU from `vendor` (12 bytes: EBX, EDX, ECX).
    static func vendorLeaf(_ vendor: String) -> CPUIDEntry {
        let bytes = Array(vendor.utf8)
        func word(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[offset + $1]) << ($1 * 8) } }
        return CPUIDEntry(function: 0, eax: 0xD, ebx: word(0), ecx: word(8), edx: word(4))
    }

    static func bits(_ names: [String], function: UInt32, index: UInt32 = 0, register: CPUIDRegister) -> UInt32 {
        names.compactMap(CPUFeature.named).filter { $0.function == function && $0.index == index && $0.register == register }
            .reduce(0) { $0 | 1 << $1.bit }
    }

    /// A host with every named feature (AVX-512 and AMX included), as KVM would offer it: the
    /// feature leaves, and XSAVE components 0-9 with a size each.
    static func richHost(vendor: String = "GenuineIntel", without missing: Set<String> = []) -> [CPUIDEntry] {
        let names = CPUFeature.known.map(\.name).filter { !missing.contains($0) }
        var entries = [vendorLeaf(vendor)]
        for (function, index) in [(UInt32(1), UInt32(0)), (7, 0), (7, 1), (0xD, 0), (0xD, 1), (0x8000_0001, 0)] {
            entries.append(CPUIDEntry(function: function, index: index,
                                      eax: bits(names, function: function, index: index, register: .eax),
                                      ebx: bits(names, function: function, index: index, register: .ebx) | (function == 0xD && index == 0 ? 2696 : 0),
                                      ecx: bits(names, function: function, index: index, register: .ecx) | (function == 0xD && index == 0 ? 2696 : 0),
                                      edx: bits(names, function: function, index: index, register: .edx)))
        }
        for component in UInt32(2)...9 {
            entries.append(CPUIDEntry(function: 0xD, index: component, eax: 64 * component, ebx: 576 + component))
        }
        return entries
    }

    @Test func aContractHoldsTheFeatureBitsButNotThoseTheVMMSets() throws {
        var guest = Self.richHost(vendor: "AuthenticAMD")
        let leaf1 = guest.firstIndex { $0.function == 1 }!
        guest[leaf1].ecx |= CPUIDSetup.leaf1HypervisorBit | CPUIDSetup.leaf1TSCDeadlineBit
        let contract = CPUContract(guest: guest, tscKHz: 2_994_000)
        #expect(contract.vendor == "AuthenticAMD")
        #expect(contract.tscKHz == 2_994_000)
        let word = try #require(contract.words.first { $0.function == 1 && $0.register == .ecx })
        #expect(word.bits & (CPUIDSetup.leaf1HypervisorBit | CPUIDSetup.leaf1TSCDeadlineBit) == 0, "bits the VMM sets on every host are no host feature")
        #expect(contract.featureNames.names.contains("avx512f") && contract.featureNames.unnamed == 0)
        #expect(contract.unmet(by: guest).isEmpty, "the host it was made on meets it")
    }

    @Test func aHostWithoutAFeatureOrOfAnotherVendorIsNamedInTheError() throws {
        let contract = CPUContract(guest: Self.richHost())
        let older = Self.richHost(without: ["avx512f", "avx512bw"])
        #expect(contract.unmet(by: older) == ["avx512f (CPUID 0x7.0 EBX bit 16)", "avx512bw (CPUID 0x7.0 EBX bit 30)"])
        let error = #expect(throws: SwiftletError.self) { try contract.check(supported: older, what: "the machine in app.swiftlet") }
        #expect(error?.code == .unsupported)
        #expect(error?.message.hasPrefix("the machine in app.swiftlet was running on a CPU with features this host's KVM does not offer: it needs avx512f (CPUID 0x7.0 EBX bit 16), avx512bw (CPUID 0x7.0 EBX bit 30).") == true,
                "\(String(describing: error))")
        #expect(contract.unmet(by: Self.richHost(vendor: "AuthenticAMD")) == ["a GenuineIntel CPU (this host's is AuthenticAMD)"])
        // A bit Swiftlet has no name for is named by its place.
        let odd = CPUContract(vendor: "", words: [.init(function: 1, register: .ecx, bits: 1 << 16)])
        #expect(odd.unmet(by: older) == ["CPUID 0x1.0 ECX bit 16"])
    }

    @Test func aTemplateShowsExactlyItsFeaturesAndTheXSAVEStateOfThem() throws {
        let host = Self.richHost()
        let shaped = CPUIDSetup.entries(from: host, cpu: 0, count: 1, tscDeadline: true)
        let v3 = CPUTemplate.x86_64_v3.apply(to: shaped)
        let contract = CPUContract(guest: v3)
        #expect(contract.features(beyond: .x86_64_v3).isEmpty)
        #expect(Set(contract.featureNames.names) == Set(CPUTemplate.x86_64_v3.features.map(\.name)), "every template feature the host has is shown")
        #expect(!contract.featureNames.names.contains("avx512f") && !contract.featureNames.names.contains("rdrand"))
        #expect(contract.features(beyond: .x86_64_v2).contains("avx2 (CPUID 0x7.0 EBX bit 5)"))
        let leaf1 = try #require(v3.entry(1, 0))
        #expect(leaf1.ecx & CPUIDSetup.leaf1HypervisorBit != 0 && leaf1.ecx & CPUIDSetup.leaf1TSCDeadlineBit != 0, "the VMM's own bits stay")
        // XSAVE: components 0-2 (x87, SSE, AVX) only; the AVX-512 components' sizes are gone.
        #expect(try #require(v3.entry(0xD, 0)).eax == 0b111)
        #expect(try #require(v3.entry(0xD, 2)).eax == 128)
        #expect(try #require(v3.entry(0xD, 5)) == CPUIDEntry(function: 0xD, index: 5))
        #expect(try #require(v3.entry(0xD, 1)).eax == 1, "XSAVEOPT only: no XSAVES and no supervisor state")
        // v4 keeps AVX-512 and its state.
        let v4 = CPUTemplate.x86_64_v4.apply(to: shaped)
        #expect(CPUContract(guest: v4).featureNames.names.contains("avx512f"))
        #expect(try #require(v4.entry(0xD, 0)).eax == 0b1110_0111)
    }

    @Test func aTemplateTheHostCannotMeetNamesWhatIsMissing() {
        #expect(CPUTemplate.x86_64_v3.missing(from: Self.richHost(without: ["avx2", "bmi2"])) == ["avx2", "bmi2"])
        #expect(CPUTemplate.x86_64_v2.missing(from: Self.richHost(without: ["avx2", "bmi2"])).isEmpty)
        #expect(CPUTemplate(named: "x86-64-v3") == .x86_64_v3 && CPUTemplate(named: "haswell") == nil)
    }

    @Test func aMachineOfATemplateSnapshotsAContractAnyHostWithTheTemplateMeets() {
        let made = CPUContract(guest: CPUTemplate.x86_64_v2.apply(to: Self.richHost()))
        // An older host: none of v3's or v4's features, but all of v2's.
        let v2Only = Set(CPUFeature.known.map(\.name)).subtracting(CPUTemplate.x86_64_v2.features.map(\.name))
        #expect(made.unmet(by: Self.richHost(without: v2Only)).isEmpty)
        #expect(!CPUContract(guest: Self.richHost()).unmet(by: Self.richHost(without: v2Only)).isEmpty, "without the template it would not move")
    }

    @Test func aRestoreRunsTheTSCAtTheGuestsFrequencyWhereItCan() throws {
        let vcpu = FakeVCPU(id: 0, script: [])
        try vcpu.setTSCKHz(3_000_000)
        var warnings: [String] = []
        try Machine.matchTSC(vcpu, guestKHz: 2_000_000, scaling: true) { warnings.append($0) }
        #expect(try vcpu.tscKHz() == 2_000_000 && warnings.isEmpty)

        try vcpu.setTSCKHz(3_000_000)
        try Machine.matchTSC(vcpu, guestKHz: 2_000_000, scaling: false) { warnings.append($0) }
        #expect(try vcpu.tscKHz() == 3_000_000)
        #expect(warnings == ["the snapshot's guest ran with a 2000000 kHz TSC and this host's is 3000000 kHz, which its KVM cannot scale: timers the guest sets in TSC cycles run early"])

        // Within KVM's 250 ppm, and with no frequency recorded, nothing is done.
        try Machine.matchTSC(vcpu, guestKHz: 3_000_700, scaling: true) { warnings.append($0) }
        try Machine.matchTSC(vcpu, guestKHz: nil, scaling: true) { warnings.append($0) }
        #expect(try vcpu.tscKHz() == 3_000_000 && warnings.count == 1)
        #expect(CPUContract.sameTSC(3_000_000, 3_000_750) && !CPUContract.sameTSC(3_000_000, 3_000_751 + 1))
        #expect(!CPUContract.sameTSC(UInt64.max, 1) && CPUContract.sameTSC(UInt64.max, UInt64.max))
    }
}
