import Glibc
import Testing
import TestSupport

/// `swiftlet run`: the default busybox image, the guest agent, exact streams and exit statuses.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct RunIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()

    func run(_ arguments: [String], stdin: String? = nil) -> Subprocess {
        Subprocess.run([swiftlet, "run"] + arguments, stdin: stdin, timeout: 300)
    }

    /// Runs a shell line on the test host (for redirections the Subprocess helper cannot do).
    func shell(_ line: String) -> Subprocess {
        Subprocess.run(["/bin/sh", "-c", line], environment: ["SWIFTLET": swiftlet, "D": dir.path], timeout: 240)
    }

    @Test func outputAndExitStatusAreExact() {
        let r = run(["--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        #expect(r.status == 7)
        #expect(r.stdout == "out\n", "nothing but the command's output on stdout")
        #expect(r.stderr == "err\n", "nothing but the command's error on stderr")
    }

    @Test func aMissingCommandIs127() {
        let r = run(["--", "no-such-command"])
        #expect(r.status == 127)
        #expect(r.stderr == "swiftlet: no-such-command: command not found\n")
    }

    @Test func optionsReachTheCommand() {
        let r = run(["-e", "FOO=bar baz", "-w", "/tmp", "-u", "nobody", "--", "sh", "-c", "echo $FOO; pwd; id -u; hostname"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "bar baz\n/tmp\n65534\nswiftlet\n")
        let i = run(["-i", "--", "sh", "-c", "tr a-z A-Z"], stdin: "from the host\n")
        #expect(i.stdout == "FROM THE HOST\n")
        let closed = run(["--", "cat"], stdin: "ignored without -i\n")
        #expect(closed.status == 0 && closed.stdout.isEmpty, "without -i the command's input is empty")
    }

    @Test func eachRunIsAFreshMachineOverAnUntouchedImage() {
        let first = run(["--", "sh", "-c", "echo written > /etc/new-file && cat /etc/new-file && rm /bin/ls && echo removed"])
        #expect(first.stdout == "written\nremoved\n", "\(first.stderr)")
        let second = run(["--", "sh", "-c", "ls /etc/new-file 2>&1; ls / >/dev/null && echo ls-still-there"])
        #expect(second.stdout.contains("No such file or directory"))
        #expect(second.stdout.contains("ls-still-there"))
    }

    @Test func signalEndsAreReportedAndCtrlCReachesTheCommand() {
        #expect(run(["--", "sh", "-c", "kill -KILL $$"]).status == 137)
        let line = #"""
            "$SWIFTLET" run -- sh -c 'trap "echo got-int; exit 3" INT; echo ready; while :; do sleep 1; done' > "$D/o" & pid=$!
            for i in $(seq 300); do grep -q ready "$D/o" && break; sleep 0.2; done
            kill -INT $pid; wait $pid; echo "status=$?"; cat "$D/o"
            """#
        let r = shell(line)
        #expect(r.stdout == "status=3\nready\ngot-int\n", "\(r.stdout)\(r.stderr)")
    }

    @Test func aTimeoutStopsTheMachine() {
        let r = run(["--timeout", "3s", "--", "sleep", "600"])
        #expect(r.status == 124)
        #expect(r.stderr.contains("did not finish within 3s"))
    }

    @Test func oneHundredMebibytesOfBinaryOutputArriveIntact() {
        let line = #"""
            "$SWIFTLET" run -- sh -c 'head -c 104857600 /dev/urandom > /tmp/x; sha256sum /tmp/x | cut -d" " -f1 >&2; cat /tmp/x' > "$D/out" 2> "$D/guest-sum"
            echo "status=$?"; cat "$D/guest-sum"; sha256sum "$D/out" | cut -d" " -f1; wc -c < "$D/out"
            """#
        let r = shell(line)
        let lines = r.stdout.split(separator: "\n").map { $0.trimmingWhitespace }
        #expect(lines.count == 4, "\(r.stdout)\(r.stderr)")
        guard lines.count == 4 else { return }
        #expect(lines[0] == "status=0")
        #expect(lines[1] == lines[2], "guest and host sha256 of the output must match")
        #expect(lines[3] == "104857600")
    }

    @Test func aConvertedTarRootfsKeepsOwnersModesAndLinks() {
        let line = #"""
            set -e; mkdir -p "$D/root/bin" "$D/root/etc" "$D/root/tmp"
            for b in /usr/bin/busybox /bin/busybox; do [ -x "$b" ] && cp "$b" "$D/root/bin/busybox" && break; done; ln -s busybox "$D/root/bin/sh"; ln -s busybox "$D/root/bin/stat"; ln -s busybox "$D/root/bin/cat"
            echo converted > "$D/root/hello.txt"; chown 1234:5678 "$D/root/hello.txt"; chmod 640 "$D/root/hello.txt"
            ln "$D/root/hello.txt" "$D/root/again.txt"
            : > "$D/root/suid"; chmod 4755 "$D/root/suid"
            cd "$D/root" && tar -cf "$D/root.tar" .
            "$SWIFTLET" image convert "$D/root.tar" -o "$D/root.erofs"
            "$SWIFTLET" run --rootfs "$D/root.erofs" -- sh -c 'cat /hello.txt; stat -c "%u:%g %a %h" /hello.txt /suid'
            """#
        let r = shell(line)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "converted\n1234:5678 640 2\n0:0 4755 1\n", "\(r.stdout)\(r.stderr)")
    }

    @Test func badInputIsAClearError() {
        let r = run(["--rootfs", dir.path + "/missing.erofs", "--", "true"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("no root filesystem image at"))
        let junk = dir.write("junk.img", [UInt8](repeating: 0x33, count: 1 << 20))
        let bad = run(["--rootfs", junk, "--", "true"])
        #expect(bad.status == 2, "\(bad.stderr)")
        #expect(bad.stderr.contains("cannot mount the image disk"), "\(bad.stderr)")
        #expect(run(["--timeout", "soon", "--", "true"]).status == 64)
    }
}
