import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet machine`: a machine in a VMM process of its own, commands side by side in it, its
/// writes kept across stops and a killed VMM process, pause and resume, and a crash reported.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct MachineIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func machine(_ arguments: [String], stdin: String? = nil) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], stdin: stdin, timeout: 300)
    }

    /// Runs a shell line with SWIFTLET_HOME set and `swiftlet` as $S.
    func shell(_ line: String) -> Subprocess {
        Subprocess.run(["/bin/sh", "-c", line], environment: ["SWIFTLET_HOME": home.path, "S": swiftlet], timeout: 300)
    }

    func counter(_ name: String) -> Int? {
        Int(trimmedLine(machine(["exec", name, "--", "cat", "/tmp/count"]).stdout))
    }

    /// Guest wall clock minus host wall clock, in seconds (read as close together as an exec allows).
    func guestClockOffset(_ name: String) -> Int? {
        let host = time(nil)
        guard let guest = Int(trimmedLine(machine(["exec", name, "--", "date", "+%s"]).stdout)) else { return nil }
        return guest - host
    }

    func trimmedLine(_ s: String) -> String { s.split(separator: "\n").first.map(String.init) ?? "" }

    @Test func aMachineRunsCommandsSideBySideAndKeepsItsWrites() throws {
        #expect(machine(["create", "--name", "box", "--memory", "128"]).status == 0)
        let started = machine(["start", "box"])
        #expect(started.status == 0 && started.stderr.contains("started machine box"), "\(started.stderr)")
        #expect(machine(["status", "box"]).stdout.contains("state: running"))
        let start2 = machine(["start", "box"])
        #expect(start2.status == 1 && start2.stderr.contains("already running"), "\(start2.stderr)")
        // What the machine keeps is the user's alone.
        func mode(_ name: String) -> mode_t {
            var info = stat()
            return lstat(home.path + "/machines/" + name, &info) == 0 ? info.st_mode & 0o7777 : 0
        }
        #expect(mode("") == 0o700 && mode("box") == 0o700)
        for file in ["box/machine.json", "box/disk.img", "box/console.log", "box/vmm.log", "box/vmm.pid", "box/control.sock", "box/lock"] {
            #expect(mode(file) == 0o600, "\(file): \(String(mode(file), radix: 8))")
        }

        // Exact streams and status, the image's defaults with -e/-w/-u over them, input, 127.
        let first = machine(["exec", "box", "--", "sh", "-c", "echo out; echo err >&2; hostname; exit 7"])
        #expect(first.status == 7 && first.stdout == "out\nbox\n" && first.stderr == "err\n", "\(first.stdout)|\(first.stderr)")
        let flags = machine(["exec", "box", "-e", "FOO=bar", "-w", "/tmp", "-u", "nobody", "--", "sh", "-c", "echo $FOO; pwd; id -u"])
        #expect(flags.stdout == "bar\n/tmp\n65534\n", "\(flags.stderr)")
        #expect(machine(["exec", "box", "-i", "--", "tr", "a-z", "A-Z"], stdin: "piped in\n").stdout == "PIPED IN\n")
        let missing = machine(["exec", "box", "--", "no-such-command"])
        #expect(missing.status == 127 && missing.stderr.contains("no-such-command"), "\(missing.stderr)")

        // Two commands at once: the second runs (and sees the first's file) while the first sleeps.
        // The file appears whole (renamed into place): a `cat` between the shell's creating it and
        // writing to it would read it empty. Each attempt that does not see it says how it ended.
        let sideBySide = shell("""
            $S machine exec box -- sh -c 'echo running > /tmp/flag.new; mv /tmp/flag.new /tmp/flag; sleep 20; rm /tmp/flag' &
            for i in $(seq 1 15); do
              $S machine exec box -- cat /tmp/flag 2>"$SWIFTLET_HOME/attempt-err" && break
              echo "attempt $i: status $?: $(cat "$SWIFTLET_HOME/attempt-err")" >&2
              sleep 1
            done
            wait
            """)
        #expect(sideBySide.stdout == "running\n", "\(sideBySide.stdout)|\(sideBySide.stderr)")

        // A counter that outlives the exec that started it (its own session), across pause/resume.
        #expect(machine(["exec", "box", "--", "sh", "-c",
                         "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done' </dev/null >/dev/null 2>&1 &"]).status == 0)
        #expect(machine(["exec", "box", "--", "sh", "-c", "echo kept > /root/kept; sync"]).status == 0)
        usleep(2_500_000)
        let before = try #require(counter("box"))
        let offsetBefore = try #require(guestClockOffset("box"))
        #expect(machine(["pause", "box"]).status == 0)
        #expect(machine(["status", "box"]).stdout.contains("state: paused"))
        let refused = machine(["exec", "box", "--", "true"])
        #expect(refused.status == 1 && refused.stderr.contains("is paused"), "\(refused.stderr)")
        usleep(4_000_000)
        #expect(machine(["resume", "box"]).status == 0)
        // The guest's wall clock has not lost the 4 s it was paused for.
        let offsetAfter = try #require(guestClockOffset("box"))
        #expect(abs(offsetAfter - offsetBefore) <= 2, "guest clock offset \(offsetBefore) s before the pause, \(offsetAfter) s after")
        usleep(2_500_000)
        let after = try #require(counter("box"))
        #expect(after > before, "the counter goes on after resume (\(before) → \(after))")

        // Stop is clean (the guest powers off); the writable disk keeps what was written.
        let stopped = machine(["stop", "box"])
        #expect(stopped.status == 0 && stopped.stderr.contains("the guest powered off"), "\(stopped.stderr)")
        #expect(machine(["status", "box"]).stdout.contains("last run: stopped: the guest powered off"))
        #expect(machine(["exec", "box", "--", "true"]).stderr.contains("is not running"))
        #expect(machine(["start", "box"]).status == 0)
        #expect(machine(["exec", "box", "--", "cat", "/root/kept"]).stdout == "kept\n")
        #expect(machine(["exec", "box", "--", "test", "-e", "/tmp/count"]).status == 0, "the root's upper layer is the disk: /tmp too")

        // A VMM process killed under the machine: reported as a crash, and the machine starts again.
        let pid = try #require(Int32(trimmedLine(try OwnedFileDescriptor.readSmallTextFile(home.path + "/machines/box/vmm.pid"))))
        #expect(machine(["exec", "box", "--", "sh", "-c", "echo after-restart > /root/second; sync"]).status == 0)
        kill(pid, SIGKILL)
        usleep(500_000)
        let crashed = machine(["status", "box"])
        #expect(crashed.stdout.contains("state: crashed") && crashed.stdout.contains("pid \(pid)"), "\(crashed.stdout)")
        let execCrashed = machine(["exec", "box", "--", "true"])
        #expect(execCrashed.status == 1 && execCrashed.stderr.contains("crashed"), "\(execCrashed.stderr)")
        #expect(machine(["start", "box"]).status == 0)
        #expect(machine(["exec", "box", "--", "cat", "/root/kept", "/root/second"]).stdout == "kept\nafter-restart\n")

        // Files in and out, byte for byte; a failed copy out leaves no file behind.
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 7) }
        let original = home.write("blob", bytes)
        #expect(machine(["cp", original, "box:/root/blob"]).status == 0)
        #expect(machine(["exec", "box", "--", "sh", "-c", "wc -c < /root/blob"]).stdout.contains("1048576"))
        let back = home.path + "/blob.back"
        let copied = machine(["cp", "box:/root/blob", back])
        #expect(copied.status == 0, "\(copied.stderr)")
        #expect(try OwnedFileDescriptor.readSmallFile(back, limit: 4 << 20) == bytes)
        let absent = machine(["cp", "box:/no/such/file", home.path + "/absent"])
        #expect(absent.status == 1 && absent.stderr.contains("the copy failed"), "\(absent.stderr)")
        #expect(access(home.path + "/absent", F_OK) != 0)
        #expect(!(OwnedFileDescriptor.directoryEntries(home.path) ?? []).contains { $0.name.hasPrefix(".absent.swiftlet") })
        // A symbolic link planted where the old copy wrote its temporary file is not written through.
        let victim = home.write("victim", Array("kept".utf8))
        #expect(symlink(victim, home.path + "/planted.swiftlet-cp") == 0)
        #expect(machine(["cp", "box:/root/blob", home.path + "/planted"]).status == 0)
        #expect(try OwnedFileDescriptor.readSmallTextFile(victim) == "kept")
        #expect(try OwnedFileDescriptor.readSmallFile(home.path + "/planted", limit: 4 << 20) == bytes)

        let rm = machine(["rm", "box"])
        #expect(rm.status == 1 && rm.stderr.contains("is running"), "\(rm.stderr)")
        #expect(machine(["exec", "box", "--", "true"]).status == 0, "a refused rm leaves the machine running")
        #expect(machine(["rm", "-f", "box"]).status == 0)
        #expect(access(home.path + "/machines/box", F_OK) != 0)
        #expect(machine(["ls"]).stdout == "NAME  STATE  IMAGE  CPUS  MEMORY  NETWORK  PORTS\n")
    }
}
