import Glibc
import Testing
import TestSupport

/// The `swiftlet` executable's behaviour on bad input: one line on stderr, a non-zero status.
@Suite struct CLITests {
    let swiftlet = TestHost.swiftletBinary
    let tiny = TemporaryDirectory()

    func run(_ arguments: [String], environment: [String: String] = [:]) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: environment)
    }

    /// A freestanding guest (not Linux) that prints, signals the marker and resets.
    var tinyKernel: String { tiny.write("tiny.elf", TinyGuest.elf(code: TinyGuest.hello("tiny guest\n", ending: TinyGuest.i8042Reset))) }

    func expectOneLineError(_ r: Subprocess, contains text: String, status: Int32 = 1, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == status, "status \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(text), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty && !$0.hasPrefix("Usage:") && !$0.hasPrefix("  See") }
        #expect(lines.count == 1, "expected one line, got: \(r.stderr)", sourceLocation: sourceLocation)
    }

    @Test func zeroAndExcessiveValuesAreRejected() {
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--cpus", "0"]), contains: "--cpus must be at least 1")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--memory", "0"]), contains: "--memory must be at least 32 MiB")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--cpus", "100000"]), contains: "--cpus 100000 is more than")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--memory", "99999999"]), contains: "--memory 99999999 MiB is more than")
    }

    @Test func badKernelFiles() {
        expectOneLineError(run(["boot", "--kernel", tiny.path + "/nope"]), contains: "cannot open kernel")
        let junk = tiny.write("junk", Array(repeating: 0x5A, count: 8192))
        expectOneLineError(run(["boot", "--kernel", junk]), contains: "neither an ELF vmlinux nor a bzImage")
        let truncated = tiny.write("truncated.elf", Array(TinyGuest.elf(code: Array(repeating: 0x90, count: 512)).prefix(300)))
        expectOneLineError(run(["boot", "--kernel", truncated]), contains: "truncated")
    }

    @Test func initrdThatDoesNotFit() {
        let initrd = tiny.sparse("big.cpio", size: 64 << 20)
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--initrd", initrd, "--memory", "48"]), contains: "does not fit in guest memory")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--initrd", tiny.path + "/missing.cpio"]), contains: "cannot open initrd")
    }

    @Test func contradictoryFlagsAreUsageErrors() {
        let r = run(["boot", "--kernel", tinyKernel, "--initrd", "x", "--no-initrd"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("contradict"))
        let quoted = run(["boot", "--kernel", tinyKernel, "--", "echo", "a\"b"])
        #expect(quoted.status == 64)
        #expect(quoted.stderr.contains("double quotes"))
        #expect(run(["boot", "--cpus", "two"]).status == 64)
    }

    @Test func badSnapshotRequests() {
        let conflict = run(["run", "--from", tiny.path, "--cpus", "2", "--", "true"])
        #expect(conflict.status == 64 && conflict.stderr.contains("--from starts the machine a snapshot holds"), "\(conflict.stderr)")
        #expect(run(["run", "--from", tiny.path, "--image", "busybox", "--", "true"]).status == 64)
        let cold = run(["run", "--from", tiny.path, "--cold", "--", "true"])
        #expect(cold.status == 64 && cold.stderr.contains("--cold"), "\(cold.stderr)")
        expectOneLineError(run(["run", "--from", tiny.path + "/none", "--", "true"]), contains: "snapshot \(tiny.path)/none does not exist")
        expectOneLineError(run(["run", "--from", tiny.path, "--", "true"]), contains: "is not a Swiftlet snapshot: it has no state file")
        _ = Subprocess.run(["/bin/mkdir", tiny.path + "/corrupt"])
        _ = tiny.write("corrupt/state", Array(repeating: 0x41, count: 200))
        expectOneLineError(run(["run", "--from", tiny.path + "/corrupt", "--", "true"]), contains: "not a Swiftlet snapshot state file")
        expectOneLineError(run(["snapshot", "-o", tiny.path]), contains: "already exists: snapshots go to a new directory")
        #expect(run(["snapshot", "-o", tiny.path + "/new", "--image", "x", "--rootfs", "y"]).status == 64)
        #expect(access(tiny.path + "/new", F_OK) != 0)
    }

    @Test func badDisks() {
        let r = run(["boot", "--kernel", tinyKernel, "--disk", "image.raw,fast"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("unknown option 'fast'"))
        #expect(run(["boot", "--kernel", tinyKernel, "--disk", ",ro"]).status == 64)
    }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func missingOrUnusableDiskFiles() {
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--disk", tiny.path + "/missing.img"]),
                           contains: "cannot open disk \(tiny.path)/missing.img")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--disk", tiny.path + ",ro"]), contains: "is not a regular file or a block device")
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--disk", tiny.path]), contains: "Is a directory")
        let empty = tiny.write("empty.img", [])
        expectOneLineError(run(["boot", "--kernel", tinyKernel, "--disk", empty + ",ro"]), contains: "at least one 512-byte sector")
    }

    @Test func badVsockForwardsAreUsageErrors() {
        let malformed = run(["boot", "--kernel", tinyKernel, "--vsock-forward", "agent.sock"])
        #expect(malformed.status == 64)
        #expect(malformed.stderr.contains("expected PORT:SOCKET"))
        let twice = run(["boot", "--kernel", tinyKernel, "--vsock-forward", "1024:/a", "--vsock-forward", "1024:/b"])
        #expect(twice.status == 64)
        #expect(twice.stderr.contains("port 1024 is given twice"))
    }

    @Test func badRunFlagsAreUsageErrors() {
        let timeout = run(["run", "--timeout", "soon", "--", "true"])
        #expect(timeout.status == 64)
        #expect(timeout.stderr.contains("expected a duration"))
        // Numbers no duration can hold are refused, not trapped on.
        for huge in ["inf", "1e300s", "nan", "400d", "9999999h"] {
            let refused = run(["run", "--timeout", huge, "--", "true"])
            #expect(refused.status == 64 && refused.stderr.contains("expected a duration"), "--timeout \(huge): \(refused.status) \(refused.stderr)")
        }
        let env = run(["run", "-e", "=value", "--", "true"])
        #expect(env.status == 64)
        #expect(env.stderr.contains("expected KEY=VALUE"))
        expectOneLineError(run(["run", "--rootfs", tiny.path + "/missing.erofs", "--", "true"]), contains: "no root filesystem image at")
        // `run` is parsed on its own first; what it refuses gets the whole tree's usage and help.
        let unknown = run(["run", "--bogus", "--", "true"])
        #expect(unknown.status == 64 && unknown.stderr.contains("Unknown option '--bogus'") && unknown.stderr.contains("Usage: swiftlet run"), "\(unknown.stderr)")
        let help = run(["run", "--help"])
        #expect(help.status == 0 && help.stdout.contains("USAGE: swiftlet run"), "\(help.stdout)")
        #expect(run(["help", "run"]).stdout == help.stdout)
        let noName = run(["machine", "exec", "--", "true"])
        #expect(noName.status == 64 && noName.stderr.contains("which machine?") && noName.stderr.contains("Usage: swiftlet machine exec"), "\(noName.stderr)")
        #expect(run(["machine", "exec", "--help"]).stdout == run(["help", "machine", "exec"]).stdout)
    }

    @Test func convertingSomethingThatIsNotATarArchive() {
        let junk = tiny.write("junk.tar", Array(repeating: 0x5A, count: 4096))
        expectOneLineError(run(["image", "convert", junk, "-o", tiny.path + "/out.erofs"]), contains: "corrupt")
        expectOneLineError(run(["image", "convert", tiny.path + "/none.tar", "-o", tiny.path + "/out.erofs"]), contains: "cannot open layer")
        #expect(access(tiny.path + "/out.erofs", F_OK) != 0)
    }

    @Test func missingKVMDevice() {
        expectOneLineError(run(["boot", "--kernel", tinyKernel], environment: ["SWIFTLET_KVM_DEVICE": "/nonexistent/kvm"]),
                           contains: "/nonexistent/kvm does not exist")
    }

    @Test(.enabled(if: TestHost.isRoot && access("/usr/bin/setpriv", X_OK) == 0 && TestHost.hasKVM, "needs root, setpriv and /dev/kvm"))
    func unreadableKVMDeviceSuggestsTheKVMGroup() {
        // As an unprivileged user (nobody), /dev/kvm (mode 0600 root, or 0660 root:kvm) is not accessible.
        let r = Subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", swiftlet, "boot", "--kernel", "/dev/null"])
        expectOneLineError(r, contains: "add your user to the kvm group")
    }

    @Test(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"))
    func tinyGuestBootsThroughTheCLI() {
        let r = run(["boot", "--kernel", tinyKernel, "--no-initrd", "--boot-timing"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "tiny guest\n")
        #expect(r.stderr.contains("boot marker after"))
        #expect(r.stderr.contains("exits to userspace"))
        #expect(r.stderr.contains("VMM overhead"))
    }

    @Test(.enabled(if: TestHost.hasKVM && TestHost.isPVM, "only PVM-backed /dev/kvm refuses Linux kernels"))
    func linuxKernelOnPVMExitsAtOnceNamingPVM() {
        let linux = tiny.write("linux.elf", TinyGuest.elf(code: TinyGuest.spin, linuxNote: true))
        let start = MonotonicNow()
        let r = run(["boot", "--kernel", linux, "--no-initrd"])
        expectOneLineError(r, contains: "PVM")
        #expect(r.stderr.contains("hardware KVM") && r.stderr.contains("PVM-enabled guest kernel"))
        #expect(MonotonicNow() - start < 5, "must not hang")
    }

    @Test func badImageInputIsAOneLineError() {
        let home = TemporaryDirectory()
        let env = ["SWIFTLET_HOME": home.path + "/store"]
        expectOneLineError(run(["image", "pull", "./no/such/dir"], environment: env), contains: "no image at ./no/such/dir")
        expectOneLineError(run(["image", "pull", "Not_A_Reference"], environment: env), contains: "invalid image reference")
        let junk = tiny.write("junk.tar", Array(repeating: 0x41, count: 4096))
        expectOneLineError(run(["image", "pull", junk], environment: env), contains: "is not a readable image archive")
        let empty = Subprocess.run(["/bin/sh", "-c", "cd \"$0\" && : > f && tar cf notimage.tar f", tiny.path])
        #expect(empty.status == 0)
        expectOneLineError(run(["image", "pull", tiny.path + "/notimage.tar"], environment: env), contains: "neither index.json (OCI) nor manifest.json")
        expectOneLineError(run(["image", "inspect", "nothing"], environment: env), contains: "no image \"nothing\"")
        expectOneLineError(run(["image", "rm", "nothing"], environment: env), contains: "no image \"nothing\"")
        expectOneLineError(run(["run", "--image", "x", "--rootfs", "y"], environment: env), contains: "cannot be used together", status: 64)
        expectOneLineError(run(["run", "-d", "-i", "--", "true"], environment: env), contains: "-d cannot be combined", status: 64)
        let policy = run(["run", "--image", "busybox", "--pull", "sometimes"], environment: env)
        #expect(policy.status == 64 && policy.stderr.contains("'missing', 'always' or 'never'"), "\(policy.stderr)")
        let listed = run(["image", "ls"], environment: env)
        #expect(listed.status == 0 && listed.stdout == "NAME  DIGEST  PLATFORM  LAYERS  SIZE\n", "\(listed.stdout)")
    }

    /// Registry pulls go through `swiftlet-pull` (beside `swiftlet`): progress relayed, the digest
    /// printed, errors as one line, Ctrl-C-free here.
    @Test(.enabled(if: TestImages.directory != nil && access("/usr/bin/docker-registry", X_OK) == 0, "needs docker-registry and the test images"))
    func registryPullsRunThroughTheHelper() throws {
        let registry = try #require(LocalRegistry())
        try #require(registry.push("oci:\(TestImages.path("layout")):latest", as: "cli/busybox:1").status == 0)
        let home = TemporaryDirectory()
        let env = ["SWIFTLET_HOME": home.path]
        let pulled = run(["image", "pull", "\(registry.host)/cli/busybox:1"], environment: env)
        #expect(pulled.status == 0, "\(pulled.stderr)")
        #expect(pulled.stdout.hasPrefix("\(registry.host)/cli/busybox:1: sha256:"), "\(pulled.stdout)")
        #expect(pulled.stderr.contains("fetching layer 1/2"), "\(pulled.stderr)")
        let listed = run(["image", "ls"], environment: env)
        #expect(listed.stdout.contains("\(registry.host)/cli/busybox:1"))
        expectOneLineError(run(["image", "pull", "\(registry.host)/cli/missing:1"], environment: env), contains: "not found in the registry")
    }

    @Test func kernelPathPointsAtTheCache() {
        let dir = TemporaryDirectory()
        let r = run(["kernel", "path"], environment: ["SWIFTLET_CACHE": dir.path])
        expectOneLineError(r, contains: "make kernel")
        _ = Subprocess.run(["/bin/mkdir", "-p", dir.path + "/kernel/abc"])
        dir.write("kernel/abc/vmlinux", [0x7F])
        _ = Subprocess.run(["/bin/ln", "-s", "abc", dir.path + "/kernel/default"])
        let found = run(["kernel", "path"], environment: ["SWIFTLET_CACHE": dir.path])
        #expect(found.status == 0)
        #expect(found.stdout == dir.path + "/kernel/abc/vmlinux\n")
    }
}

func MonotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
