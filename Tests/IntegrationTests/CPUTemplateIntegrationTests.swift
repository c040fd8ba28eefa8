import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `--cpu-template`: a guest shown a CPU baseline sees only its features (here: the nested test
/// host's KVM offers BMI2, RDRAND, SMEP and more that x86-64-v2 hides, and no AVX-512, so v4 is
/// refused by name); its snapshot and pack keep it, and a pack's CPU contract holds no more
/// than the template; a machine that was not made with a template cannot be packed as one.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct CPUTemplateIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()
    var home: String { dir.path + "/home" }

    func swiftlet(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: ["SWIFTLET_HOME": home], timeout: 600)
    }

    /// The CPU flags a guest's /proc/cpuinfo lists (its first processor).
    func flags(_ output: String) -> Set<String> {
        let line = output.split(separator: "\n").first { $0.hasPrefix("flags") } ?? ""
        return Set(line.split(separator: ":").dropFirst().joined().split(separator: " ").map(String.init))
    }

    /// Features the nested host's guests see that x86-64-v2 hides.
    static let beyondV2: Set<String> = ["bmi1", "bmi2", "rdrand", "movbe", "smep", "aes", "pclmulqdq", "rdtscp"]

    @Test func aTemplatesGuestSeesOnlyItsFeaturesAndItsSnapshotAndPackKeepThem() throws {
        let plain = swiftlet(["run", "--", "cat", "/proc/cpuinfo"])
        try #require(plain.status == 0, "\(plain.stderr)")
        try #require(flags(plain.stdout).isSuperset(of: Self.beyondV2), "without a template the guest sees the host's: \(flags(plain.stdout).sorted())")

        let v2 = swiftlet(["run", "--cpu-template", "x86-64-v2", "--", "cat", "/proc/cpuinfo"])
        try #require(v2.status == 0, "\(v2.stderr)")
        let v2Flags = flags(v2.stdout)
        #expect(v2Flags.isSuperset(of: ["sse4_2", "ssse3", "popcnt", "cx16", "lahf_lm", "nx", "lm"]), "\(v2Flags.sorted())")
        #expect(v2Flags.isDisjoint(with: Self.beyondV2.union(["avx", "xsave", "svm", "sse4a"])), "\(v2Flags.sorted())")

        // v3 shows its features the host has (the guest kernel here leaves XSAVE, and so AVX,
        // unused: the nested host's own kernel runs without it), and still nothing beyond.
        let v3 = swiftlet(["run", "--cpu-template", "x86-64-v3", "--", "cat", "/proc/cpuinfo"])
        try #require(v3.status == 0, "\(v3.stderr)")
        #expect(flags(v3.stdout).isSuperset(of: ["bmi1", "bmi2", "movbe", "f16c", "abm", "fsgsbase", "smep"]), "\(flags(v3.stdout).sorted())")
        #expect(flags(v3.stdout).isDisjoint(with: ["rdrand", "aes", "pclmulqdq", "rdtscp", "svm", "sse4a", "smap", "adx"]), "\(flags(v3.stdout).sorted())")
        // This host has no AVX-512: v4 is refused, naming what is missing.
        let v4 = swiftlet(["run", "--cpu-template", "x86-64-v4", "--", "true"])
        #expect(v4.status == 1 && v4.stderr.contains("lacks avx512f") && v4.stderr.contains("of the x86-64-v4 CPU template: use a lower one (x86-64-v2, x86-64-v3) or none"),
                "\(v4.stderr)")

        // A snapshot of a v2 machine packs as v2; its contract names no AVX, and it restores as v2.
        let snapshot = dir.path + "/v2.snap", pack = dir.path + "/v2.swiftlet"
        let made = swiftlet(["snapshot", "--cpu-template", "x86-64-v2", "-o", snapshot])
        try #require(made.status == 0, "\(made.stderr)")
        let packed = swiftlet(["pack", "create", "--from", snapshot, "--cpu-template", "x86-64-v2", "-o", pack])
        try #require(packed.status == 0, "\(packed.stderr)")
        let inspected = swiftlet(["pack", "inspect", pack])
        #expect(inspected.stdout.contains("sse4_2") && !inspected.stdout.contains("bmi2") && !inspected.stdout.contains("rdrand"), "\(inspected.stdout)")
        let restored = swiftlet(["pack", "run", pack, "--", "cat", "/proc/cpuinfo"])
        #expect(restored.status == 0 && flags(restored.stdout) == v2Flags, "\(restored.stdout)\(restored.stderr)")

        // A snapshot of a machine that saw the host's CPU is not a v2 machine.
        let hostSnapshot = dir.path + "/host.snap"
        try #require(swiftlet(["snapshot", "-o", hostSnapshot]).status == 0)
        let refused = swiftlet(["pack", "create", "--from", hostSnapshot, "--cpu-template", "x86-64-v2", "-o", dir.path + "/no.swiftlet"])
        #expect(refused.status == 1 && refused.stderr.contains("was shown CPU features the x86-64-v2 template does not have (")
                    && refused.stderr.contains("bmi2 (CPUID 0x7.0 EBX bit 8)"), "\(refused.stderr)")
        #expect(access(dir.path + "/no.swiftlet", F_OK) != 0)
        // A snapshot cannot be given another CPU when it is run.
        let reshaped = swiftlet(["run", "--image", pack, "--cpu-template", "x86-64-v3", "--", "true"])
        #expect(reshaped.status == 64 && reshaped.stderr.contains("--cpu-template"), "\(reshaped.stderr)")
    }

    @Test func aMachineMadeWithATemplateBootsWithItEveryTime() throws {
        let created = swiftlet(["machine", "create", "--name", "v2", "--cpu-template", "x86-64-v2"])
        try #require(created.status == 0, "\(created.stderr)")
        #expect(created.stderr.contains("CPU x86-64-v2"), "\(created.stderr)")
        let record = try OwnedFileDescriptor.readSmallTextFile(home + "/machines/v2/machine.json")
        #expect(record.contains("\"cpuTemplate\" : \"x86-64-v2\""), "\(record)")
        defer { _ = swiftlet(["machine", "rm", "-f", "v2"]) }
        for _ in 0..<2 {
            try #require(swiftlet(["machine", "start", "v2"]).status == 0)
            let cpuinfo = swiftlet(["machine", "exec", "v2", "--", "cat", "/proc/cpuinfo"])
            #expect(cpuinfo.status == 0 && flags(cpuinfo.stdout).contains("sse4_2") && flags(cpuinfo.stdout).isDisjoint(with: Self.beyondV2),
                    "\(cpuinfo.stdout)\(cpuinfo.stderr)")
            #expect(swiftlet(["machine", "stop", "v2"]).status == 0)
        }
    }
}
