import Testing
import TestSupport

/// Boots the real guest kernel with `swiftlet boot`. These run in the nested test host
/// (`make test-nested`), where /dev/kvm boots unmodified Linux; elsewhere they are skipped.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct BootIntegrationTests {
    let swiftlet = TestHost.swiftletBinary

    /// Runs `swiftlet boot`; the console's CRLF line ends (the guest tty's ONLCR) become LF.
    func boot(_ arguments: [String], stdin: String? = nil) -> Subprocess {
        var r = Subprocess.run([swiftlet, "boot"] + arguments, stdin: stdin, timeout: 180)
        r.stdout = r.stdout.replacingCRLF
        return r
    }

    func kernelPath(bzImage: Bool = false) -> String {
        let r = Subprocess.run([swiftlet, "kernel", "path"] + (bzImage ? ["--bz-image"] : []))
        return r.stdout.trimmingWhitespace
    }

    @Test func vmlinuxBootsAndRunsACommand() {
        let r = boot(["--boot-timing", "--", "uname", "-sr"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Linux 6.1"))
        #expect(r.stderr.contains("boot marker after"))
        #expect(r.stderr.contains("the guest rebooted"))
    }

    @Test func bzImageBoots() {
        let r = boot(["--kernel", kernelPath(bzImage: true), "--", "echo", "from-bzimage"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("from-bzimage"))
    }

    @Test(arguments: [1, 4, 8])
    func allCPUsComeOnline(cpus: Int) {
        let r = boot(["--cpus", String(cpus), "--", "nproc"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").contains { $0.trimmingWhitespace == String(cpus) }, "\(r.stdout)")
    }

    @Test func poweroffIsACleanExit() {
        let r = boot(["--", "poweroff", "-f"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Power down"))
    }

    @Test func rebootIsACleanExit() {
        let r = boot(["--", "reboot", "-f"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Restarting system"))
    }

    @Test func argumentsWithSpacesReachTheGuest() {
        let r = boot(["--", "sh", "-c", "echo one two; echo three"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("one two\nthree"))
    }

    @Test func consoleInputReachesTheGuest() {
        let r = boot(["--", "sh", "-c", "read line; echo got:$line"], stdin: "hello-guest\n")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("got:hello-guest"))
    }

    @Test func kernelPanicIsAFailure() {
        let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3 rdinit=/bin/false"
        let r = boot(["--cmdline", cmdline])
        #expect(r.status == 2)
        #expect(r.stdout.contains("Kernel panic"))
        #expect(r.stderr.contains("the guest kernel panicked"))
    }

    @Test func bootWithoutInitrdPanicsCleanly() {
        // No initramfs and no root disk: the kernel cannot mount root and panics.
        let r = boot(["--no-initrd"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("panicked"))
    }

    @Test func largeMemoryAboveFourGigabytes() {
        let r = boot(["--memory", "4608", "--", "sh", "-c", "grep MemTotal /proc/meminfo"])
        #expect(r.status == 0, "\(r.stderr)")
        let kib = r.stdout.split(separator: "\n").first { $0.hasPrefix("MemTotal:") }?
            .split(separator: " ").compactMap { Int($0) }.first ?? 0
        #expect(kib > 4_000_000, "\(r.stdout)")
    }
}

extension String {
    var replacingCRLF: String {
        var out = ""
        for c in self { if c == "\r\n" { out.append("\n") } else { out.append(c) } }
        return out
    }
}

extension StringProtocol {
    var trimmingWhitespace: String {
        String(drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
}
