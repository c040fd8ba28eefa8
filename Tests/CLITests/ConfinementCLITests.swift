import Glibc
import Testing
import TestSupport

/// A VMM process confines itself before its guest runs (seccomp filter, no new privileges, a
/// descriptor bound), and a system call outside its list ends it with a clear message. `swiftlet
/// boot` with a freestanding tiny guest is the VMM process here (it needs /dev/kvm, PVM will do).
@Suite(.serialized) struct ConfinementCLITests {
    let swiftlet = TestHost.swiftletBinary
    let tiny = TemporaryDirectory()

    var helloKernel: String { tiny.write("tiny.elf", TinyGuest.elf(code: TinyGuest.hello("tiny guest\n", ending: TinyGuest.i8042Reset))) }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func aRunningVMMIsUnderASeccompFilter() {
        let spin = tiny.write("spin.elf", TinyGuest.elf(code: TinyGuest.spin))
        // The VMM in the background; its /proc status once the guest runs, then it is killed.
        let r = Subprocess.run(["/bin/sh", "-c", """
            "$0" boot --kernel "$1" --no-initrd > /dev/null & pid=$!
            for i in $(seq 100); do grep -q '^Seccomp:[[:space:]]*2' /proc/$pid/status && break; sleep 0.1; done
            grep -E '^(Seccomp|NoNewPrivs):' /proc/$pid/status; grep -E 'Max (open files|file size)' /proc/$pid/limits
            kill -KILL $pid
            """, swiftlet, spin], timeout: 60)
        let fields = r.stdout.split(separator: "\n").map { $0.split(whereSeparator: \.isWhitespace).joined(separator: " ") }
        #expect(fields.contains("Seccomp: 2"), "\(r.stdout)|\(r.stderr)")
        #expect(fields.contains("NoNewPrivs: 1"), "\(r.stdout)")
        #expect(fields.contains("Max open files 4096 4096 files"), "\(r.stdout)")
        // Its files are bounded by the largest it writes: a snapshot's memory file of the
        // machine's 256 MiB (boot's default), plus 64 MiB for headers and indexes.
        #expect(fields.contains("Max file size \((256 + 64) << 20) \((256 + 64) << 20) bytes"), "\(r.stdout)")
    }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func aForbiddenCallEndsTheVMMWithAClearMessage() {
        let r = Subprocess.run([swiftlet, "boot", "--kernel", helloKernel, "--no-initrd"],
                               environment: ["SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL": "1"], timeout: 60)
        #expect(r.status == 128 + SIGSYS, "\(r.status): \(r.stderr)")
        #expect(r.stderr.contains("swiftlet: seccomp: forbidden system call 135 (personality)"), "\(r.stderr)")
        #expect(r.stdout.isEmpty, "the guest never ran: \(r.stdout)")
    }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func theFilterCanBeTurnedOffAndABadSettingIsAnError() {
        let off = Subprocess.run([swiftlet, "boot", "--kernel", helloKernel, "--no-initrd"],
                                 environment: ["SWIFTLET_SECCOMP": "off", "SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL": "1"], timeout: 60)
        #expect(off.status == 0 && off.stdout == "tiny guest\n", "\(off.status): \(off.stderr)")
        let bad = Subprocess.run([swiftlet, "boot", "--kernel", helloKernel, "--no-initrd"], environment: ["SWIFTLET_SECCOMP": "maybe"], timeout: 60)
        #expect(bad.status != 0 && bad.stderr.contains("SWIFTLET_SECCOMP=maybe: expected on, off or log"), "\(bad.stderr)")
    }

    /// `swiftlet-pull` confines itself before it talks to a registry (here the test hook's call
    /// ends it before it connects anywhere).
    @Test func thePullHelperConfinesItselfBeforeTheRegistry() throws {
        let slash = try #require(swiftlet.lastIndex(of: "/"))
        let helper = String(swiftlet[..<slash]) + "/swiftlet-pull"
        try #require(access(helper, X_OK) == 0)
        let home = TemporaryDirectory()
        let r = Subprocess.run([helper, "--insecure-registry", "127.0.0.1:9/nothing:1"],
                               environment: ["SWIFTLET_HOME": home.path, "SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL": "1"], timeout: 60)
        #expect(r.status == 128 + SIGSYS, "\(r.status): \(r.stderr)")
        #expect(r.stderr.contains("swiftlet: seccomp: forbidden system call 135 (personality)"), "\(r.stderr)")
    }
}
