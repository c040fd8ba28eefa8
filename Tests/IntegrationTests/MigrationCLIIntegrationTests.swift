import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet machine receive` and `machine migrate` between two SWIFTLET_HOMEs on one host: a
/// running machine moves with its memory (a counter in tmpfs), its disk (written while it
/// moves) and its published port, and nothing of it stays behind; a wrong token, or a guest
/// writing faster than the pause allows, moves nothing.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct MigrationCLIIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let source = TemporaryDirectory()
    let destination = TemporaryDirectory()

    func machine(_ home: TemporaryDirectory, _ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    /// Runs `machine receive box` in the destination in the background, `migrate` with the token
    /// it printed (or `token` instead) from the source, and waits for both; prints `migrate N`,
    /// `receive N` (their statuses) and their output files' paths hold the rest.
    /// The nested test host emulates its CPU (tens of times slower than hardware): the pause aimed
    /// for is longer than a real host's default 50 ms.
    func move(token: String? = nil, receiveTimeout: String = "2m", port: Int, flags: String = "--max-downtime 5s") -> Subprocess {
        let script = """
            rm -f $A/migrate.out $A/migrate.err $B/receive.out $B/receive.err
            SWIFTLET_HOME=$B $S machine receive box --listen 127.0.0.1:\(port) --timeout \(receiveTimeout) > $B/receive.out 2> $B/receive.err &
            pid=$!
            for i in $(seq 1 300); do [ -s $B/receive.out ] && break; sleep 0.1; done
            token=$(head -n 1 $B/receive.out)
            \(token.map { "token=\($0)" } ?? "")
            SWIFTLET_HOME=$A $S machine migrate box --to 127.0.0.1:\(port) --token "$token" \(flags) --json > $A/migrate.out 2> $A/migrate.err
            echo "migrate $?"
            wait $pid
            echo "receive $?"
            """
        return Subprocess.run(["/bin/sh", "-c", script], environment: ["A": source.path, "B": destination.path, "S": swiftlet], timeout: 600)
    }

    func text(_ path: String) -> String { (try? OwnedFileDescriptor.readSmallTextFile(path, limit: 1 << 20)) ?? "" }

    func exec(_ home: TemporaryDirectory, _ line: String) -> String {
        machine(home, ["exec", "box", "--", "sh", "-c", line]).stdout
    }

    /// The numbers in `text`, one per line.
    func numbers(_ text: String) -> [Int] { text.split(separator: "\n").compactMap { Int($0) } }

    @Test func aRunningMachineMovesWithItsMemoryDiskAndPortAndLeavesNothingBehind() throws {
        #expect(machine(source, ["create", "--name", "box", "--memory", "256", "-p", "127.0.0.1:18090:80"]).status == 0)
        let started = machine(source, ["start", "box"])
        try #require(started.status == 0, "\(started.stderr)")
        // A counter in tmpfs (memory), another on the disk synced each step, a file on the disk,
        // and a web server on the published port.
        let setup = machine(source, ["exec", "box", "--", "sh", "-c", """
            echo kept > /root/kept; sync
            setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i >> /dev/shm/seq; sleep 0.1; done' </dev/null >/dev/null 2>&1 &
            setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i >> /root/dseq; sync; sleep 0.2; done' </dev/null >/dev/null 2>&1 &
            mkdir -p /tmp/www; echo moved-page > /tmp/www/index.html; setsid httpd -p 80 -h /tmp/www </dev/null >/dev/null 2>&1
            """])
        try #require(setup.status == 0, "\(setup.stderr)")
        var before = 0
        let counting = MonotonicClock.now + 30_000_000_000
        while before <= 3 && MonotonicClock.now < counting {
            usleep(500_000)
            before = numbers(exec(source, "cat /dev/shm/seq")).last ?? 0
        }
        #expect(before > 3, "the guest counts before it moves")
        // A command running in an exec session when the machine moves: it ends with a clear message.
        _ = sh("(SWIFTLET_HOME=$A $S machine exec box -- sleep 600 > $A/exec.out 2> $A/exec.err; echo $? > $A/exec.status) < /dev/null > /dev/null 2>&1 &")

        let moved = move(port: 17701, flags: "--max-downtime 5s --bandwidth 512M")
        #expect(moved.stdout.contains("migrate 0") && moved.stdout.contains("receive 0"),
                "\(moved.stdout)\nmigrate: \(text(source.path + "/migrate.err"))\nreceive: \(text(destination.path + "/receive.err"))")
        let report = text(source.path + "/migrate.out")
        #expect(report.contains("\"downtimeMilliseconds\"") && report.contains("\"rounds\""), "\(report)")
        #expect(text(destination.path + "/receive.out").split(separator: "\n").first?.count == 64, "the token alone on the first line")

        // Nothing stays at the source; the destination runs it.
        #expect(machine(source, ["status", "box"]).status != 0)
        #expect(access(source.path + "/machines/box", F_OK) != 0)
        #expect(machine(destination, ["status", "box"]).stdout.contains("state: running"))
        usleep(1_000_000)
        let memory = numbers(exec(destination, "cat /dev/shm/seq"))
        #expect(memory == Array(1...(memory.last ?? 1)) && (memory.last ?? 0) > before,
                "the count in memory goes on without a gap or a repeat: \(memory.suffix(20)), \(before) before")
        let disk = numbers(exec(destination, "cat /root/dseq"))
        #expect(disk == Array(1...(disk.last ?? 1)) && disk.count > 3, "the disk's count goes on: \(disk.suffix(20))")
        #expect(exec(destination, "cat /root/kept") == "kept\n")
        let page = Subprocess.run(["/bin/sh", "-c", "timeout 10 wget -q -O - http://127.0.0.1:18090/"], timeout: 30)
        #expect(page.stdout == "moved-page\n", "the published port answers from the destination: \(page.stdout)|\(page.stderr)")

        let execDeadline = MonotonicClock.now + 30_000_000_000
        while text(source.path + "/exec.status").isEmpty && MonotonicClock.now < execDeadline { usleep(100_000) }
        #expect(text(source.path + "/exec.status") != "0\n" && text(source.path + "/exec.err").contains("moved to another host"),
                "the exec cut short by the move says so: \(text(source.path + "/exec.status"))|\(text(source.path + "/exec.err"))")

        // It stops and starts again there, from its disk.
        #expect(machine(destination, ["stop", "box"]).status == 0)
        #expect(machine(destination, ["start", "box"]).status == 0)
        #expect(exec(destination, "cat /root/kept") == "kept\n")
        _ = machine(destination, ["rm", "-f", "box"])
    }

    @Test func aWrongTokenOrAGuestTooBusyToConvergeMovesNothingAndTheMachineRunsOn() throws {
        #expect(machine(source, ["create", "--name", "box", "--memory", "128"]).status == 0)
        try #require(machine(source, ["start", "box"]).status == 0)
        let wrong = String(repeating: "ab", count: 32)
        let moved = move(token: wrong, receiveTimeout: "8s", port: 17702)
        #expect(moved.stdout.contains("migrate 1"), "\(moved.stdout)")
        let refusal = text(source.path + "/migrate.err")
        #expect(refusal.contains("token"), "\(refusal)")
        #expect(moved.stdout.contains("receive 1"), "the receive gives up when no source with the token came: \(moved.stdout)")
        #expect(text(destination.path + "/receive.err").contains("no migration source connected"), "\(text(destination.path + "/receive.err"))")
        #expect(access(destination.path + "/machines/box", F_OK) != 0, "nothing arrived")
        #expect(machine(source, ["status", "box"]).stdout.contains("state: running"))
        #expect(exec(source, "echo still-here") == "still-here\n")

        // A guest that writes memory faster than the pause allows: the migration says it does
        // not converge, the destination takes nothing, and the machine runs on here.
        #expect(machine(source, ["exec", "box", "--", "sh", "-c",
                                 "setsid sh -c 'while true; do dd if=/dev/urandom of=/dev/shm/churn bs=64k count=32 2>/dev/null; done' </dev/null >/dev/null 2>&1 &"]).status == 0)
        let busy = move(port: 17703, flags: "--max-downtime 1ms --max-rounds 3")
        #expect(busy.stdout.contains("migrate 1") && busy.stdout.contains("receive 1"), "\(busy.stdout)")
        #expect(text(source.path + "/migrate.err").contains("does not converge"), "\(text(source.path + "/migrate.err"))")
        #expect(text(destination.path + "/receive.err").contains("does not converge"), "the destination hears why: \(text(destination.path + "/receive.err"))")
        #expect(access(destination.path + "/machines/box", F_OK) != 0, "nothing arrived")
        #expect(exec(source, "echo still-here") == "still-here\n")

        // The same guest with --postcopy: the destination runs it at once and takes the pages
        // still at the source as its guest touches them, the rest pushed; memory is intact.
        let sum = exec(source, "dd if=/dev/urandom of=/dev/shm/kept bs=1M count=8 2>/dev/null; md5sum /dev/shm/kept")
        #expect(sum.count > 32)
        let postcopy = move(port: 17704, flags: "--max-downtime 1ms --max-rounds 3 --postcopy")
        #expect(postcopy.stdout.contains("migrate 0") && postcopy.stdout.contains("receive 0"),
                "\(postcopy.stdout)|\(text(source.path + "/migrate.err"))|\(text(destination.path + "/receive.err"))")
        #expect(text(source.path + "/migrate.out").contains("\"postcopyPages\""), "\(text(source.path + "/migrate.out"))")
        #expect(exec(destination, "md5sum /dev/shm/kept") == sum, "memory arrived intact")
        #expect(exec(destination, "echo arrived") == "arrived\n")
        #expect(access(source.path + "/machines/box", F_OK) != 0)
        _ = machine(destination, ["rm", "-f", "box"])
        #expect(machine(source, ["create", "--name", "box", "--memory", "128"]).status == 0)
        try #require(machine(source, ["start", "box"]).status == 0)

        // Bad flags say what is wrong.
        let badToken = machine(source, ["migrate", "box", "--to", "127.0.0.1:17702", "--token", "xyz"])
        #expect(badToken.status != 0 && badToken.stderr.contains("64 hex digits"), "\(badToken.stderr)")
        let badRate = machine(source, ["migrate", "box", "--to", "127.0.0.1:17702", "--token", wrong, "--bandwidth", "0"])
        #expect(badRate.status != 0 && badRate.stderr.contains("bytes per second"), "\(badRate.stderr)")
        let badAddress = machine(destination, ["receive", "box2", "--listen", "nowhere"])
        #expect(badAddress.status != 0 && badAddress.stderr.contains("HOST:PORT"), "\(badAddress.stderr)")
        _ = machine(source, ["rm", "-f", "box"])
    }

    /// Runs `script` with $A and $B the two homes and $S the swiftlet binary.
    func sh(_ script: String) -> Subprocess {
        Subprocess.run(["/bin/sh", "-c", script], environment: ["A": source.path, "B": destination.path, "S": swiftlet], timeout: 600)
    }

    /// The start of a migration in the background: `receive` ($rp) and `migrate FLAGS` ($mp),
    /// their outputs in $B/receive.* and $A/migrate.*.
    func startMove(port: Int, flags: String, receiveTimeout: String = "60s") -> String {
        """
        rm -f $A/migrate.out $A/migrate.err $B/receive.out $B/receive.err
        SWIFTLET_HOME=$B $S machine receive box --listen 127.0.0.1:\(port) --timeout \(receiveTimeout) > $B/receive.out 2> $B/receive.err &
        rp=$!
        for i in $(seq 1 300); do [ -s $B/receive.out ] && break; sleep 0.1; done
        SWIFTLET_HOME=$A $S machine migrate box --to 127.0.0.1:\(port) --token "$(head -n 1 $B/receive.out)" \(flags) > $A/migrate.out 2> $A/migrate.err &
        mp=$!
        """
    }

    @Test func killingEitherSideMidwayLeavesExactlyOneMachine() throws {
        #expect(machine(source, ["create", "--name", "box", "--memory", "128"]).status == 0)
        try #require(machine(source, ["start", "box"]).status == 0)
        // A guest that keeps the copy going round after round (it never fits a 1 ms pause).
        #expect(machine(source, ["exec", "box", "--", "sh", "-c",
                                 "setsid sh -c 'echo $$ > /tmp/churn.pid; while true; do dd if=/dev/urandom of=/dev/shm/churn bs=64k count=32 2>/dev/null; done' </dev/null >/dev/null 2>&1 &"]).status == 0)
        let busy = "--max-downtime 1ms --max-rounds 1000 --json"
        // Waits until the copy is in its second round (the progress lines of --json).
        let rounding = "\nfor i in $(seq 1 600); do grep -q '\"round\":1' $A/migrate.out 2>/dev/null && break; sleep 0.1; done"

        // The destination's VMM process dies during the rounds: the source goes on, nothing stays there.
        let destinationKilled = sh(startMove(port: 17711, flags: busy + " --timeout 60s") + rounding + """

            kill -9 "$(cat $B/machines/box/vmm.pid)"
            wait $mp; echo "migrate $?"
            wait $rp; echo "receive $?"
            """)
        #expect(destinationKilled.stdout.contains("migrate 1") && destinationKilled.stdout.contains("receive 1"),
                "\(destinationKilled.stdout)|\(text(source.path + "/migrate.err"))|\(text(destination.path + "/receive.err"))")
        #expect(access(destination.path + "/machines/box", F_OK) != 0, "the destination keeps nothing")
        #expect(exec(source, "echo still-here") == "still-here\n")

        // The `migrate` command dies during the rounds: the source's VMM process carries on until
        // the copy gives up (its time limit), and the machine runs on at the source.
        let clientKilled = sh(startMove(port: 17712, flags: busy + " --timeout 8s") + rounding + """

            kill -9 $mp
            wait $rp; echo "receive $?"
            """)
        #expect(clientKilled.stdout.contains("receive 1"), "\(clientKilled.stdout)|\(text(destination.path + "/receive.err"))")
        #expect(text(destination.path + "/receive.err").contains("does not converge"), "\(text(destination.path + "/receive.err"))")
        #expect(access(destination.path + "/machines/box", F_OK) != 0)
        #expect(exec(source, "echo still-here") == "still-here\n")

        // A quiet guest, and the `migrate` command dies at once: the move completes without it,
        // the destination runs the machine, and the source's copy is set aside for good (its name
        // is free again), never left to be started a second time.
        _ = exec(source, "kill $(cat /tmp/churn.pid)")
        let quietKilled = sh(startMove(port: 17713, flags: "--max-downtime 5s --json") + "\n" + """
            for i in $(seq 1 300); do [ -s $A/migrate.out ] && break; sleep 0.05; done
            kill -9 $mp
            wait $rp; echo "receive $?"
            """)
        #expect(quietKilled.stdout.contains("receive 0"), "\(quietKilled.stdout)|\(text(destination.path + "/receive.err"))")
        #expect(exec(destination, "echo arrived") == "arrived\n")
        let deadline = MonotonicClock.now + 30_000_000_000
        while machine(source, ["status", "box"]).status == 0 && MonotonicClock.now < deadline { usleep(200_000) }
        #expect(machine(source, ["status", "box"]).status != 0, "the source's copy is gone")
        #expect(!machine(source, ["ls"]).stdout.contains("box"))
        #expect(machine(source, ["create", "--name", "box", "--memory", "128"]).status == 0, "the name is free at the source")
        _ = machine(source, ["rm", "-f", "box"])
        _ = machine(destination, ["rm", "-f", "box"])
    }

    /// The destination's VMM process dies while the source is paused for the last pages, before
    /// `go`: the source resumes and runs on, the destination keeps nothing. It dies during a
    /// post-copy's fetch, after `go`: the machine's newest state died with it, so the source
    /// stays paused (it cannot know what the destination did meanwhile), says so, and runs again
    /// once resumed.
    @Test func killingTheDestinationInThePauseOrDuringAPostcopyFetch() throws {
        #expect(machine(source, ["create", "--name", "box", "--memory", "128"]).status == 0)
        try #require(machine(source, ["start", "box"]).status == 0)
        #expect(machine(source, ["exec", "box", "--", "sh", "-c",
                                 "setsid sh -c 'while true; do dd if=/dev/urandom of=/dev/shm/churn bs=64k count=32 2>/dev/null; done' </dev/null >/dev/null 2>&1 &"]).status == 0)
        let pausing = "\nfor i in $(seq 1 2400); do grep -q '\"pausing\":true' $A/migrate.out 2>/dev/null && break; sleep 0.05; done"

        // At 2 MiB/s what the guest wrote during the first round takes seconds to send while the
        // machine is paused (a 20 s budget lets it pause right after that round).
        let inPause = sh(startMove(port: 17714, flags: "--max-downtime 20s --bandwidth 2M --timeout 120s --json") + pausing + """

            sleep 0.2
            kill -9 "$(cat $B/machines/box/vmm.pid)"
            wait $mp; echo "migrate $?"
            wait $rp; echo "receive $?"
            """)
        #expect(text(source.path + "/migrate.out").contains("\"pausing\":true"), "\(text(source.path + "/migrate.out"))")
        #expect(inPause.stdout.contains("migrate 1") && inPause.stdout.contains("receive 1"),
                "\(inPause.stdout)|\(text(source.path + "/migrate.err"))|\(text(destination.path + "/receive.err"))")
        #expect(access(destination.path + "/machines/box", F_OK) != 0, "the destination keeps nothing")
        #expect(machine(source, ["status", "box"]).stdout.contains("state: running"), "the source resumed")
        #expect(exec(source, "echo still-here") == "still-here\n")

        // Post-copy after one round: the machine runs at the destination at once, the pages
        // still here follow at 2 MiB/s, and the destination dies among them.
        let inPostcopy = sh(startMove(port: 17715, flags: "--max-downtime 1ms --max-rounds 1 --postcopy --bandwidth 2M --timeout 120s --json")
                            + pausing + """

            for i in $(seq 1 400); do grep -q "arrived by migration" $B/machines/box/vmm.log 2>/dev/null && break; sleep 0.05; done
            sleep 0.3
            kill -9 "$(cat $B/machines/box/vmm.pid)"
            wait $mp; echo "migrate $?"
            wait $rp
            """)
        #expect(inPostcopy.stdout.contains("migrate 1"), "\(inPostcopy.stdout)|\(text(source.path + "/migrate.err"))")
        #expect(text(source.path + "/migrate.err").contains("stays paused here"), "\(text(source.path + "/migrate.err"))")
        #expect(!machine(destination, ["status", "box"]).stdout.contains("state: running"), "the destination's machine died")
        _ = machine(destination, ["rm", "-f", "box"])
        #expect(machine(source, ["resume", "box"]).status == 0, "the source's machine is paused and resumes when told")
        #expect(exec(source, "echo resumed") == "resumed\n")
        _ = machine(source, ["rm", "-f", "box"])
    }
}
