import Glibc
import Synchronization
import SwiftletSystem
import Testing
import TestSupport

/// Boot templates: the first `run` of a machine shape saves its boot, later runs restore it and
/// mount their image on it; a damaged template is replaced, never a reason to fail.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct BootTemplateIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func run(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "run", "--timing"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    var templates: [String] {
        (OwnedFileDescriptor.directoryEntries(home.path + "/templates") ?? []).map(\.0).sorted()
    }

    /// The phases a `--timing` run went through, by name.
    func phases(_ r: Subprocess) -> [String] {
        guard let line = r.stderr.split(separator: "\n").first(where: { $0.hasPrefix("swiftlet: timing ") }) else { return [] }
        return line.split(separator: " ").dropFirst(2).compactMap { $0.split(separator: "=").first.map(String.init) }
    }

    /// stderr without the timing line.
    func errors(_ r: Subprocess) -> String {
        r.stderr.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.hasPrefix("swiftlet: timing ") }.joined(separator: "\n")
    }

    static let probe = ["--", "sh", "-c", "echo out; echo err >&2; hostname; ls /bin/busybox; grep -c swiftlet.root= /proc/cmdline; exit 7"]

    /// The probe's output: the image is the root, mounted at boot (`cold`) or asked for later.
    func expectProbe(_ r: Subprocess, cold: Bool = false, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 7, "\(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stdout == "out\nswiftlet\n/bin/busybox\n\(cold ? 1 : 0)\n", sourceLocation: sourceLocation)
        #expect(errors(r) == "err\n", sourceLocation: sourceLocation)
    }

    @Test func theFirstRunSavesTheBootAndLaterRunsRestoreIt() {
        let first = run(Self.probe)
        expectProbe(first)
        #expect(phases(first) == ["process", "image", "vm", "connected", "ready", "template", "root", "command", "teardown"])
        #expect(templates.count == 1)
        guard let saved = templates.first else { return }
        #expect(access(home.path + "/templates/\(saved)/memory", R_OK) == 0)
        #expect(access(home.path + "/templates/\(saved)/working-set", F_OK) != 0, "the booting run recorded no working set")

        for _ in 0..<2 {
            let again = run(Self.probe)
            expectProbe(again)
            #expect(phases(again) == ["process", "snapshot", "vm", "connected", "ready", "root", "command", "teardown"], "restored, not booted")
        }
        #expect(templates == [saved], "restores leave the template as it was")
        #expect(access(home.path + "/templates/\(saved)/working-set", R_OK) == 0, "the first restore recorded its working set")

        // Another shape has a template of its own; --cold boots and saves nothing.
        expectProbe(run(["--memory", "192"] + Self.probe))
        #expect(templates.count == 2)
        let cold = run(["--cold"] + Self.probe)
        expectProbe(cold, cold: true)
        #expect(!phases(cold).contains("template") && !phases(cold).contains("root"))
        #expect(templates.count == 2)

        // Templates are a cache: `image prune` deletes them, and the next run saves one again.
        let prune = Subprocess.run([swiftlet, "image", "prune"], environment: ["SWIFTLET_HOME": home.path], timeout: 60)
        #expect(prune.status == 0, "\(prune.stderr)")
        #expect(templates.isEmpty)
        #expect(phases(run(Self.probe)).contains("template"))
    }

    @Test func machinesFromOneTemplateDoNotShareRandomness() {
        #expect(run(["--", "true"]).status == 0)
        let line = ["--", "sh", "-c", "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1"]
        let a = run(line), b = run(line)
        #expect(a.status == 0 && b.status == 0, "\(a.stderr)\(b.stderr)")
        #expect(phases(a).contains("snapshot") && phases(b).contains("snapshot"))
        #expect(a.stdout.split(separator: "\n").count == 2)
        let (aLines, bLines) = (a.stdout.split(separator: "\n"), b.stdout.split(separator: "\n"))
        #expect(aLines.first != bLines.first, "each machine has its own boot id")
        #expect(aLines.last != bLines.last, "each machine's kernel random generator was reseeded")
    }

    @Test func aDamagedTemplateIsReplacedAndTheRunSucceeds() throws {
        #expect(run(["--", "true"]).status == 0)
        let saved = try #require(templates.first)
        let directory = home.path + "/templates/" + saved

        // A memory file cut short: the restored machine cannot start; the run boots instead.
        #expect(truncate(directory + "/memory", 4096) == 0)
        let afterTruncation = run(Self.probe)
        expectProbe(afterTruncation)
        #expect(phases(afterTruncation).contains("template"), "booted and saved a new template")
        #expect(phases(run(Self.probe)).contains("snapshot"), "the new template restores")

        // A flipped byte in the state file: refused when read; the run boots instead.
        let state = try #require(templates.first.map { home.path + "/templates/" + $0 + "/state" })
        var bytes = try OwnedFileDescriptor.readSmallFile(state, limit: 64 << 20)
        bytes[bytes.count / 2] ^= 0x40
        let fd = open(state, O_WRONLY | O_TRUNC)
        #expect(bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count)
        close(fd)
        let afterFlip = run(Self.probe)
        expectProbe(afterFlip)
        #expect(phases(afterFlip).contains("template"))
        #expect(templates.count == 1, "the damaged template went, nothing half-written stayed: \(templates)")
    }

    @Test func aTemplateOfAReplacedKernelIsDeletedWhenTheNextIsSaved() throws {
        let kernel = Subprocess.run([swiftlet, "kernel", "path"]).stdout.trimmingWhitespace
        let copy = home.path + "/vmlinux"
        #expect(Subprocess.run(["/bin/cp", kernel, copy]).status == 0)
        expectProbe(run(["--kernel", copy] + Self.probe))
        expectProbe(run(Self.probe))
        let before = templates
        #expect(before.count == 2, "one per kernel")

        // The copied kernel is rebuilt (here: rewritten in place): its template can never be
        // restored again, and goes when the new kernel's is saved. The other kernel's stays.
        #expect(Subprocess.run(["/bin/sh", "-c", "cat \"$0\" > \"$0.new\" && mv \"$0.new\" \"$0\"", copy]).status == 0)
        let rebuilt = run(["--kernel", copy] + Self.probe)
        expectProbe(rebuilt)
        #expect(phases(rebuilt).contains("template"))
        let after = templates
        #expect(after.count == 2, "\(before) → \(after)")
        #expect(Set(after).intersection(before).count == 1, "the default kernel's template stays, the replaced one's went")
        #expect(phases(run(["--kernel", copy] + Self.probe)).contains("snapshot"))
    }

    @Test func concurrentFirstRunsLeaveOneTemplate() throws {
        let results = Mutex<[Subprocess]>([])
        var threads: [OSThread] = []
        for _ in 0..<2 {
            threads.append(try OSThread.start(name: "run") {
                let r = run(Self.probe)
                results.withLock { $0.append(r) }
            })
        }
        for thread in threads { thread.join() }
        for r in results.withLock({ $0 }) { expectProbe(r) }
        #expect(templates.count == 1, "\(templates)")
        #expect(phases(run(Self.probe)).contains("snapshot"))
    }
}
