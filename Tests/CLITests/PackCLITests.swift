import Glibc
import Hypervisor
import Pack
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet pack` and `run --image FILE` on packs this host can judge without a guest: what a
/// pack holds, a damaged or foreign one, a pack that is not a snapshot's, and bad flags; each
/// with one line on stderr and nothing left in the home.
@Suite struct PackCLITests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()
    var home: String { dir.path + "/home" }

    func run(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: ["SWIFTLET_HOME": home])
    }

    /// A pack of `parts` (name, contents).
    func pack(_ name: String, _ parts: [(String, [UInt8])], kind: PackManifest.Kind = .snapshot, cpu: CPUContract? = nil) throws -> String {
        let path = dir.path + "/" + name
        let file = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        let writer = try PackWriter(fd: file.rawValue)
        for (part, bytes) in parts { try writer.add(name: part, bytes: bytes) }
        _ = try writer.finish(kind: kind, createdBy: "PackCLITests", cpu: cpu)
        return path
    }

    func expectOneLine(_ r: Subprocess, status: Int32 = 1, contains text: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == status, "status \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(text), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty && !$0.hasPrefix("Usage:") && !$0.hasPrefix("  See") }
        #expect(lines.count == 1, "expected one line, got: \(r.stderr)", sourceLocation: sourceLocation)
    }

    @Test func inspectAndVerifyShowAndCheckThePartsAndNameWhatIsDamaged() throws {
        let memory = [UInt8](repeating: 0, count: 3 << 20) + Array(repeating: 9, count: 100)
        let path = try pack("a.swiftlet", [("state", Array("state".utf8)), ("memory", memory)])
        let inspected = run(["pack", "inspect", path])
        #expect(inspected.status == 0, "\(inspected.stderr)")
        #expect(inspected.stdout.contains("kind: snapshot, format 1, made by PackCLITests"), "\(inspected.stdout)")
        #expect(inspected.stdout.split(separator: "\n").contains { $0.hasPrefix("memory") && $0.contains("3.0 MiB") }, "\(inspected.stdout)")
        let json = run(["pack", "inspect", "--json", path])
        #expect(json.status == 0 && json.stdout.contains("\"parts\"") && json.stdout.contains("\"encoding\":\"zero\""), "\(json.stdout)")
        let verified = run(["pack", "verify", path])
        #expect(verified.status == 0 && verified.stdout.contains("intact"), "\(verified.stderr)")

        var bytes = try OwnedFileDescriptor.readSmallFile(path, limit: 16 << 20)
        bytes[2] ^= 0xff // in the state's chunk, the first one stored (5 bytes at 0)
        let damaged = dir.write("damaged.swiftlet", bytes)
        expectOneLine(run(["pack", "verify", damaged]), contains: "part state of \(damaged) is damaged")
        expectOneLine(run(["pack", "inspect", dir.write("text", Array("not a pack at all, but long enough to hold a footer's worth of bytes; and more of it".utf8))]),
                      contains: "is not a Swiftlet pack")
        expectOneLine(run(["pack", "verify", dir.path + "/missing.swiftlet"]), contains: "missing.swiftlet")
    }

    @Test func aPackedProgramSaysWhatItIsAndTakesOnlyRunsOptions() throws {
        // Swiftlet's executable with a pack appended (one without a snapshot: its runs fail early).
        let program = dir.path + "/tool"
        let swiftletBytes = try OwnedFileDescriptor.readSmallFile(swiftlet, limit: 1 << 30)
        do { // closed before it runs (ETXTBSY)
            let file = try OwnedFileDescriptor.open(program, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o755)
            try file.write(swiftletBytes, at: 0, what: program)
            let writer = try PackWriter(fd: file.rawValue, start: UInt64(swiftletBytes.count))
            try writer.add(name: "memory", bytes: [1])
            _ = try writer.finish(kind: .snapshot, createdBy: "PackCLITests")
        }
        let help = Subprocess.run([program, "--help"], environment: ["SWIFTLET_HOME": home])
        #expect(help.status == 0 && help.stdout.contains("tool: a machine packed into one program by Swiftlet (snapshot, 1 parts")
                    && help.stdout.contains("USAGE: tool [options] [-- COMMAND [ARG]...]"), "\(help.stdout)\(help.stderr)")
        for option in ["-d", "--kernel=/vmlinux", "--image"] {
            let refused = Subprocess.run([program, option, "--", "true"], environment: ["SWIFTLET_HOME": home])
            expectOneLine(refused, status: 64, contains: "\(option): tool is a packed machine")
        }
        // It runs its pack as `run --image` does (this one has no state), unpacking outside any home.
        let run = Subprocess.run([program, "--", "true"], environment: ["TMPDIR": dir.path])
        expectOneLine(run, contains: "has no part state")
        #expect(!(OwnedFileDescriptor.directoryEntries(dir.path) ?? []).contains { $0.name.hasPrefix("swiftlet-pack") }, "nothing left unpacked")
        // One whose pack has a part its kind has not: refused before its temporary directory is made.
        let odd = dir.path + "/odd-tool"
        do {
            let file = try OwnedFileDescriptor.open(odd, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o755)
            try file.write(swiftletBytes, at: 0, what: odd)
            let writer = try PackWriter(fd: file.rawValue, start: UInt64(swiftletBytes.count))
            for (name, bytes) in [("state", [UInt8(1)]), ("memory", [2]), ("kernel", [3])] { try writer.add(name: name, bytes: bytes) }
            _ = try writer.finish(kind: .snapshot, createdBy: "PackCLITests")
        }
        expectOneLine(Subprocess.run([odd, "--", "true"], environment: ["TMPDIR": dir.path]), contains: "holds a part kernel")
        #expect(!(OwnedFileDescriptor.directoryEntries(dir.path) ?? []).contains { $0.name.hasPrefix("swiftlet-pack") }, "nothing left unpacked")
        // `swiftlet` itself is no packed program.
        #expect(!Subprocess.run([swiftlet, "--help"]).stdout.contains("packed"))
    }

    @Test func runRefusesAPackWithoutASnapshotOrWithShapingFlagsAndLeavesNothing() throws {
        // A pack with a state and memory but an unknown part: refused before anything is unpacked.
        let odd = try pack("odd.swiftlet", [("state", [1]), ("memory", [2]), ("kernel", [3])])
        expectOneLine(run(["run", "--image", odd, "--", "true"]), contains: "holds a part kernel, which a snapshot pack does not have")
        let noState = try pack("nostate.swiftlet", [("memory", [2])])
        expectOneLine(run(["run", "--image", noState, "--", "true"]), contains: "has no part state")
        // A pack with a state that is not one: the snapshot's own checks refuse it.
        let fake = try pack("fake.swiftlet", [("state", Array("no state".utf8)), ("memory", [2])])
        let r = run(["run", "--image", fake, "--", "true"])
        #expect(r.status == 1 && r.stderr.contains("state"), "\(r.stderr)")
        #expect((OwnedFileDescriptor.directoryEntries(home + "/unpacked") ?? []).isEmpty, "nothing left unpacked")
        expectOneLine(run(["run", "--image", fake, "--cpus", "2", "--", "true"]), status: 64, contains: "is a pack, which holds its machine")
        // An image's pack takes run's shape, not another kernel.
        let image = try pack("image.swiftlet", [("image", Array("{}".utf8))], kind: .image)
        expectOneLine(run(["run", "--image", image, "--kernel", "/vmlinux", "--", "true"]), status: 64, contains: "--kernel cannot be combined")
        expectOneLine(run(["run", "--image", image, "--memory", "512", "--", "true"]), contains: "has no part kernel")
        expectOneLine(run(["pack", "create", "--from", dir.path + "/none", "-o", dir.path + "/out.swiftlet"]), contains: "does not exist")
        expectOneLine(run(["pack", "create", "--from", "a", "--machine", "b", "-o", dir.path + "/out.swiftlet"]), status: 64, contains: "give one of")
        expectOneLine(run(["pack", "create", "--image", "a", "--from", "b", "-o", dir.path + "/out.swiftlet"]), status: 64, contains: "give one of")
        expectOneLine(run(["pack", "create", "--from", "a", "--with-memory", "-o", dir.path + "/out.swiftlet"]), status: 64, contains: "--with-memory goes with --machine")
        expectOneLine(run(["pack", "create", "--machine", "b", "--executable", "-o", dir.path + "/out.swiftlet"]), status: 64, contains: "pack the machine --with-memory")
        expectOneLine(run(["pack", "create", "--machine", "nope", "-o", dir.path + "/out.swiftlet"]), contains: "nope")
        expectOneLine(run(["machine", "create", "--name", "m", "--from", fake, "--cpus", "2"]), status: 64, contains: "--from makes the machine a pack holds")
        expectOneLine(run(["machine", "create", "--name", "m", "--from", odd]), contains: "holds a part kernel")
        #expect(access(home + "/machines/m", F_OK) != 0, "no machine is left of a refused pack")
        #expect(access(dir.path + "/out.swiftlet", F_OK) != 0)
    }

    /// A pack's memory that needs a CPU feature this host's KVM does not offer (CPUID leaf 1 ECX
    /// bit 16, reserved: no host has it; and AVX-512F, named) is refused by name before anything
    /// is unpacked; `pack inspect` shows what it needs.
    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func aPackWhoseCPUThisHostLacksIsRefusedBeforeUnpacking() throws {
        let contract = CPUContract(vendor: "", words: [.init(function: 1, register: .ecx, bits: 1 << 16 | 1 << 20),
                                                       .init(function: 7, register: .ebx, bits: 1 << 5)], tscKHz: 2_100_000)
        let path = try pack("future.swiftlet", [("state", Array("state".utf8)), ("memory", [1])], cpu: contract)
        let inspected = run(["pack", "inspect", path])
        #expect(inspected.stdout.contains("cpu: any vendor, TSC 2100000 kHz; its memory needs sse4_2 avx2 and 1 more feature bits"), "\(inspected.stdout)")
        let json = run(["pack", "inspect", "--json", path])
        #expect(json.stdout.contains("\"cpu\":{\"tscKHz\":2100000,\"vendor\":\"\",\"words\":["), "\(json.stdout)")
        for arguments in [["run", "--image", path, "--", "true"], ["pack", "run", path, "--", "true"], ["machine", "create", "--name", "m", "--from", path]] {
            expectOneLine(run(arguments), contains: "the machine in \(path) was running on a CPU with features this host's KVM does not offer: it needs CPUID 0x1.0 ECX bit 16")
        }
        #expect((OwnedFileDescriptor.directoryEntries(home + "/unpacked") ?? []).isEmpty, "nothing unpacked")
        #expect(access(home + "/machines/m", F_OK) != 0, "no machine made")
        // A contract this host meets lets the pack on to its own checks (here: a state that is none).
        let met = try pack("met.swiftlet", [("state", Array("state".utf8)), ("memory", [1])],
                           cpu: CPUContract(vendor: "", words: [.init(function: 1, register: .edx, bits: 1 << 0)]))
        let r = run(["run", "--image", met, "--", "true"])
        #expect(r.status == 1 && !r.stderr.contains("CPU") && r.stderr.contains("state"), "\(r.stderr)")
    }

    /// `pack push` and `pack pull` through a real registry with basic auth: the pack comes back
    /// byte for byte and verifies; a file that is no pack is not pushed; without credentials the
    /// registry's refusal is one clear line.
    @Test(.enabled(if: access("/usr/bin/docker-registry", X_OK) == 0, "needs docker-registry"))
    func packsGoThroughARegistryWithItsAuth() throws {
        let registry = try #require(LocalRegistry(authenticated: true))
        let memory = [UInt8](repeating: 0, count: 2 << 20) + Array(repeating: 7, count: 3 << 20)
        let path = try pack("app.swiftlet", [("state", Array("state".utf8)), ("memory", memory)])
        let reference = "\(registry.host)/packs/app:v1"
        let credentials = ["SWIFTLET_HOME": home, "SWIFTLET_REGISTRY_USER": LocalRegistry.user, "SWIFTLET_REGISTRY_PASSWORD": LocalRegistry.password]
        let anonymous = run(["pack", "push", path, reference])
        #expect(anonymous.status == 1 && anonymous.stderr.split(separator: "\n").last?.contains("requires a user name and password") == true, "\(anonymous.stderr)")
        let pushed = Subprocess.run([swiftlet, "pack", "push", path, reference], environment: credentials)
        #expect(pushed.status == 0 && pushed.stdout.hasPrefix("\(reference)@sha256:") && pushed.stderr.hasPrefix("swiftlet: pushing app.swiftlet (") && pushed.stderr.hasSuffix(") to \(reference)\n"),
                "\(pushed.stdout)\(pushed.stderr)")
        let output = dir.path + "/pulled.swiftlet"
        let pulled = Subprocess.run([swiftlet, "pack", "pull", reference, "-o", output], environment: credentials)
        #expect(pulled.status == 0 && pulled.stdout.contains(reference), "\(pulled.stdout)\(pulled.stderr)")
        #expect(try OwnedFileDescriptor.readSmallFile(output, limit: 8 << 20) == OwnedFileDescriptor.readSmallFile(path, limit: 8 << 20))
        #expect(run(["pack", "verify", output]).status == 0)
        expectOneLine(Subprocess.run([swiftlet, "pack", "push", dir.write("text", Array("no pack".utf8)), reference], environment: credentials),
                      contains: "is not a Swiftlet pack")
        expectOneLine(Subprocess.run([swiftlet, "pack", "pull", "\(registry.host)/packs/none:v1", "-o", dir.path + "/none.swiftlet"], environment: credentials),
                      contains: "not found in the registry")
        #expect(access(dir.path + "/none.swiftlet", F_OK) != 0)
    }
}
