import CLinux
import Glibc
import SwiftletSystem
import Testing
import TestSupport
import VMM

/// Confinement with real guests: a machine's VMM process runs under its seccomp filter (and
/// serves exec, snapshot and fork under it), a forbidden call ends `swiftlet run`, `swiftlet
/// snapshot` and a machine's VMM with a clear message, and an ordinary user in the group that owns /dev/kvm runs
/// machines without root.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct ConfinementIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func machine(_ arguments: [String], environment: [String: String] = [:]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path].merging(environment) { $1 }, timeout: 300)
    }

    /// /proc/PID/status's fields, whitespace squeezed: "Seccomp: 2".
    func status(of pid: String) -> [String] {
        ((try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/status")) ?? "").split(separator: "\n")
            .map { $0.split(whereSeparator: \.isWhitespace).joined(separator: " ") }
    }

    /// Each thread's name and how many seccomp filters it has (filters stack per thread).
    func filtersByThread(of pid: String) -> [String: Int] {
        let listing = Subprocess.run(["/bin/sh", "-c", "for t in /proc/$0/task/*; do echo \"$(cat $t/comm) $(grep Seccomp_filters: $t/status | cut -f2)\"; done", pid], timeout: 30)
        var filters: [String: Int] = [:]
        for line in listing.stdout.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let count = Int(parts[1]) { filters[String(parts[0]), default: count] = max(filters[String(parts[0])] ?? 0, count) }
        }
        return filters
    }

    func vmmPID(_ name: String, home: String) -> String {
        ((try? OwnedFileDescriptor.readSmallTextFile(home + "/machines/\(name)/vmm.pid")) ?? "").trimmingPrefix(" ").split(separator: "\n").first.map(String.init) ?? ""
    }

    @Test func aMachinesVMMProcessRunsUnderItsSeccompFilter() {
        #expect(machine(["create", "--name", "box", "--memory", "128"]).status == 0)
        let started = machine(["start", "box"])
        #expect(started.status == 0, "\(started.stderr)")
        let pid = vmmPID("box", home: home.path)
        let fields = status(of: pid)
        #expect(fields.contains("Seccomp: 2"), "VMM \(pid): \(fields)")
        #expect(fields.contains("NoNewPrivs: 1"), "\(fields)")
        // Per thread kind: the process's filter everywhere; vCPU threads add theirs, device
        // threads (vsock's event loop) theirs, and the vCPU's (a vCPU thread started them).
        let filters = filtersByThread(of: pid)
        #expect(filters["swiftlet"] == 1 && filters["vcpu0"] == 2 && filters["vsock"] == 3, "\(filters)")
        let limits = (try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/limits")) ?? ""
        let openFiles = limits.split(separator: "\n").first { $0.hasPrefix("Max open files") }?.split(whereSeparator: \.isWhitespace)
        #expect(openFiles.map { Array($0.dropFirst(3).prefix(2)) } == ["4096", "4096"], "\(limits)")
        // No thread of it keeps a capability (the tests run as root): capabilities are per thread.
        let caps = Subprocess.run(["/bin/sh", "-c", "grep -H -E '^Cap(Eff|Prm):' /proc/$0/task/*/status", pid], timeout: 30)
        let capLines = caps.stdout.split(separator: "\n")
        #expect(capLines.count >= 4 && capLines.allSatisfy { $0.hasSuffix("0000000000000000") }, "\(caps.stdout)")
        // What a machine does, under the filter: exec with input, pause, snapshot, a fork's new VMMs.
        let exec = Subprocess.run(["/bin/sh", "-c", "echo hello | \"$0\" machine exec box -i -- cat", swiftlet], environment: ["SWIFTLET_HOME": home.path], timeout: 300)
        #expect(exec.status == 0 && exec.stdout == "hello\n", "\(exec.stderr)")
        #expect(machine(["pause", "box"]).status == 0)
        #expect(machine(["resume", "box"]).status == 0)
        let snapshot = home.path + "/snap"
        let taken = machine(["snapshot", "box", "-o", snapshot])
        #expect(taken.status == 0, "\(taken.stderr)")
        let forked = machine(["fork", "--from", "box", "--name", "kid", "--count", "1"])
        #expect(forked.status == 0, "\(forked.stderr)")
        #expect(status(of: vmmPID("kid", home: home.path)).contains("Seccomp: 2"))
        let kidFilters = filtersByThread(of: vmmPID("kid", home: home.path))
        // A restored device's thread starts before the process confines itself and adds its
        // filter before its first guest work.
        #expect(kidFilters["vcpu0"] == 2 && kidFilters["vsock"] == 2, "\(kidFilters)")
        #expect(machine(["exec", "kid", "--", "true"]).status == 0)
        #expect(machine(["stop", "kid"]).status == 0)
        #expect(machine(["stop", "box"]).status == 0)
        let log = (try? OwnedFileDescriptor.readSmallTextFile(home.path + "/machines/box/vmm.log")) ?? ""
        #expect(!log.contains("seccomp"), "\(log)")
    }

    /// CPU time (user + system, clock ticks) thread `tid` of process `pid` has used.
    func cpuTicks(_ pid: pid_t, thread tid: pid_t) -> Int {
        let stat = (try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/task/\(tid)/stat")) ?? ""
        guard let end = stat.lastIndex(of: ")") else { return -1 }
        let fields = stat[stat.index(after: end)...].split(separator: " ") // fields[0] is the state, field 3
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return -1 }
        return user + system
    }

    @Test func aVMMOutOfDescriptorsBacksOffAndServesClientsOnceItHasSomeAgain() throws {
        #expect(machine(["create", "--name", "full", "--memory", "128"]).status == 0)
        let started = machine(["start", "full"])
        try #require(started.status == 0, "\(started.stderr)")
        defer { _ = machine(["stop", "full"]) }
        let pid = try #require(pid_t(vmmPID("full", home: home.path)))
        // The descriptor limit at the lowest free number: the VMM's next accept fails with EMFILE.
        let open = Set((OwnedFileDescriptor.directoryEntries("/proc/\(pid)/fd") ?? []).compactMap { Int($0.name) })
        let lowestFree = (0...).first { !open.contains($0) }!
        var soft = UInt64(lowestFree), hard = UInt64(Confinement.descriptorLimit)
        try #require(swiftlet_swap_descriptor_limit(pid, &soft, &hard) == 0)
        // Clients wait in the control socket's backlog; the accept loop (the main thread) waits
        // for descriptors instead of spinning on its readable listener.
        let socket = home.path + "/machines/full/control.sock"
        var clients = try (0..<4).map { _ throws(SwiftletError) in try UnixSocket.connect(to: socket) }
        let before = cpuTicks(pid, thread: pid)
        usleep(2_000_000)
        let spent = cpuTicks(pid, thread: pid) - before
        #expect(before >= 0 && spent < 50, "the accept loop used \(spent) clock ticks in 2 s")
        clients.removeAll()
        try #require(swiftlet_swap_descriptor_limit(pid, &soft, &hard) == 0)
        let status = machine(["status", "full"])
        #expect(status.status == 0 && status.stdout.contains("running"), "\(status.stdout) \(status.stderr)")
        #expect(machine(["exec", "full", "--", "true"]).status == 0)
    }

    @Test func aForbiddenCallEndsTheVMMWithAClearMessage() {
        let env = ["SWIFTLET_HOME": home.path, "SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL": "1"]
        let run = Subprocess.run([swiftlet, "run", "--", "echo", "ran"], environment: env, timeout: 300)
        #expect(run.status == 128 + SIGSYS && !run.stdout.contains("ran"), "\(run.status) \(run.stdout)")
        #expect(run.stderr.contains("swiftlet: seccomp: forbidden system call 135 (personality)"), "\(run.stderr)")
        // `swiftlet snapshot`'s machine is confined the same way (and leaves no snapshot).
        let snapshot = Subprocess.run([swiftlet, "snapshot", "-o", home.path + "/doomed.snap"], environment: env, timeout: 300)
        #expect(snapshot.status == 128 + SIGSYS && snapshot.stderr.contains("forbidden system call 135 (personality)"),
                "\(snapshot.status) \(snapshot.stderr)")
        #expect(access(home.path + "/doomed.snap", F_OK) != 0)

        #expect(machine(["create", "--name", "doomed", "--memory", "128"]).status == 0)
        let started = machine(["start", "doomed"], environment: ["SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL": "1"])
        #expect(started.status != 0, "\(started.stderr)")
        let log = (try? OwnedFileDescriptor.readSmallTextFile(home.path + "/machines/doomed/vmm.log")) ?? ""
        #expect(log.contains("swiftlet: seccomp: forbidden system call 135 (personality)"), "vmm.log: \(log)")

        // The same without the filter: the hook's call is harmless.
        let off = Subprocess.run([swiftlet, "run", "--", "echo", "ran"], environment: env.merging(["SWIFTLET_SECCOMP": "off"]) { $1 }, timeout: 300)
        #expect(off.status == 0 && off.stdout == "ran\n", "\(off.stderr)")
    }

    /// An ordinary user whose only way to /dev/kvm is the group that owns it runs `run`,
    /// `machine create/start/exec/fork/stop`, with a home and a cache of its own.
    @Test(.enabled(if: TestHost.isRoot, "switching to another user needs root"))
    func anOrdinaryUserInTheKVMGroupRunsMachines() throws {
        let uid: uid_t = 4242, kvmGroup: gid_t = 4243
        var kvm = stat()
        try #require(stat("/dev/kvm", &kvm) == 0)
        // /dev/kvm as a distribution sets it up: root:kvm 0660 (put back afterwards).
        #expect(chown("/dev/kvm", 0, kvmGroup) == 0 && chmod("/dev/kvm", 0o660) == 0)
        defer { _ = chown("/dev/kvm", kvm.st_uid, kvm.st_gid); _ = chmod("/dev/kvm", kvm.st_mode & 0o7777) }
        // The user's own cache: the guest kernel, the agent and the default image, copied.
        let cache = home.path + "/cache", userHome = home.path + "/user"
        for asset in [GuestAssets.defaultKernel(), GuestAssets.agentInitrd, GuestAssets.defaultImage] {
            let target = cache + asset.dropFirst(GuestAssets.cacheDirectory.count)
            let copied = Subprocess.run(["/bin/sh", "-c", "mkdir -p \"$(dirname \"$1\")\" && cp \"$0\" \"$1\"", asset, target])
            #expect(copied.status == 0, "\(copied.stderr)")
        }
        _ = Subprocess.run(["/bin/mkdir", "-p", userHome])
        #expect(Subprocess.run(["/bin/chown", "-R", "\(uid):\(uid)", home.path]).status == 0)
        #expect(chmod(home.path, 0o755) == 0)
        func asUser(_ arguments: [String], stdin: String? = nil) -> Subprocess {
            Subprocess.run(["/usr/bin/setpriv", "--reuid=\(uid)", "--regid=\(uid)", "--groups=\(kvmGroup)", "--inh-caps=-all", swiftlet] + arguments,
                           environment: ["HOME": userHome, "SWIFTLET_HOME": userHome + "/swiftlet", "SWIFTLET_CACHE": cache],
                           stdin: stdin, timeout: 300)
        }
        let run = asUser(["run", "--", "sh", "-c", "echo from the guest"])
        #expect(run.status == 0 && run.stdout == "from the guest\n", "\(run.status): \(run.stderr)")
        #expect(asUser(["machine", "create", "--name", "mine", "--memory", "128"]).status == 0)
        let started = asUser(["machine", "start", "mine"])
        #expect(started.status == 0, "\(started.stderr)")
        let pid = vmmPID("mine", home: userHome + "/swiftlet")
        let fields = status(of: pid)
        #expect(fields.contains("Uid: \(uid) \(uid) \(uid) \(uid)") && fields.contains("Seccomp: 2"), "\(fields)")
        let exec = asUser(["machine", "exec", "mine", "-i", "--", "cat"], stdin: "typed\n")
        #expect(exec.status == 0 && exec.stdout == "typed\n", "\(exec.stderr)")
        let forked = asUser(["machine", "fork", "--from", "mine", "--name", "kid", "--count", "1"])
        #expect(forked.status == 0, "\(forked.stderr)")
        #expect(asUser(["machine", "exec", "kid", "--", "true"]).status == 0)
        #expect(asUser(["machine", "stop", "kid"]).status == 0)
        #expect(asUser(["machine", "stop", "mine"]).status == 0)
    }
}
