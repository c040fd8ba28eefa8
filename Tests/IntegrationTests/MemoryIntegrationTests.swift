import FoundationEssentials
import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// Elastic memory (virtio-balloon with free page reporting), through the CLI: memory a guest
/// frees goes back to the host within seconds, and stays out of a snapshot; `machine memory`
/// shrinks and grows a running machine.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct MemoryIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func machine(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    func exec(_ line: String) -> Subprocess { machine(["exec", "box", "--", "sh", "-c", line]) }

    struct Status: Decodable {
        var state: String
        var hostMemoryMiB: Int?
        var memoryTargetMiB: Int?
        var balloonMiB: Int?
    }

    func status() throws -> Status {
        let out = machine(["status", "box", "--json"])
        try #require(out.status == 0, "\(out.stderr)")
        return try JSONDecoder().decode(Status.self, from: Data(out.stdout.utf8))
    }

    /// Polls the status every half second for up to `seconds` until `done` holds; the last status.
    func waitFor(seconds: Int, _ done: (Status) -> Bool) throws -> Status {
        let deadline = MonotonicClock.now + UInt64(seconds) * 1_000_000_000
        var last = try status()
        while !done(last) && MonotonicClock.now < deadline {
            usleep(500_000)
            last = try status()
        }
        return last
    }

    /// MemAvailable in the guest, MiB.
    func guestAvailableMiB() -> Int {
        let line = exec("grep MemAvailable /proc/meminfo").stdout
        return (line.split(separator: " ").compactMap { Int($0) }.first ?? -1) >> 10
    }

    @Test func memoryTheGuestFreesGoesBackToTheHostAndStaysOutOfASnapshot() throws {
        #expect(machine(["create", "--name", "box", "--memory", "768"]).status == 0)
        let started = machine(["start", "box"])
        try #require(started.status == 0, "\(started.stderr)")
        defer { _ = machine(["rm", "-f", "box"]) }
        let idle = try status()
        let idleMiB = try #require(idle.hostMemoryMiB)
        #expect(idle.balloonMiB == 0 && idle.memoryTargetMiB == 768, "a balloon that holds nothing: \(idle)")

        // 400 MiB of bytes that are not zeros in a tmpfs (a snapshot would keep them if they
        // stayed in host memory), then deleted: the guest frees them and reports them.
        let fill = exec("""
            mkdir -p /mnt/t && mount -t tmpfs -o size=600m tmpfs /mnt/t && yes swiftlet-balloon | head -c 419430400 > /mnt/t/x && ls -l /mnt/t/x
            """)
        try #require(fill.status == 0, "\(fill.stderr)")
        let filled = try #require(try status().hostMemoryMiB)
        #expect(filled >= idleMiB + 350, "the guest's 400 MiB are in host memory: \(idleMiB) MiB idle, \(filled) MiB filled")
        #expect(exec("rm /mnt/t/x").status == 0)
        let freed = try waitFor(seconds: 30) { ($0.hostMemoryMiB ?? .max) <= filled - 300 }
        #expect((freed.hostMemoryMiB ?? .max) <= filled - 300,
                "within seconds the host has the freed memory back: \(filled) MiB filled, \(freed.hostMemoryMiB ?? -1) MiB 30 s after")

        let snapshot = home.path + "/snap"
        let taken = machine(["snapshot", "box", "-o", snapshot])
        try #require(taken.status == 0, "\(taken.stderr)")
        var st = stat()
        #expect(stat(snapshot + "/memory", &st) == 0)
        let allocatedMiB = Int(st.st_blocks) * 512 >> 20
        #expect(allocatedMiB < 200, "the freed 400 MiB are holes in the snapshot's memory file: \(allocatedMiB) MiB allocated")
    }

    @Test func aMemoryTargetShrinksAndGrowsARunningMachine() throws {
        #expect(machine(["create", "--name", "box", "--memory", "768"]).status == 0)
        let started = machine(["start", "box"])
        try #require(started.status == 0, "\(started.stderr)")
        defer { _ = machine(["rm", "-f", "box"]) }
        #expect(guestAvailableMiB() > 600)

        let set = machine(["memory", "box", "256M"])
        #expect(set.status == 0 && set.stderr.contains("keep 256 of 768 MiB"), "\(set.stderr)")
        let shrunk = try waitFor(seconds: 60) { ($0.balloonMiB ?? 0) >= 500 }
        #expect(shrunk.memoryTargetMiB == 256 && (shrunk.balloonMiB ?? 0) >= 500, "the guest hands over the rest: \(shrunk)")
        let available = guestAvailableMiB()
        #expect(available > 0 && available < 300, "the guest has about 256 MiB left: \(available) MiB available")
        #expect(machine(["status", "box"]).stdout.contains("memory target: 256 MiB"))
        #expect(exec("echo still-here").stdout == "still-here\n")

        #expect(machine(["memory", "box", "1G"]).status == 0, "more than the machine has means all of it")
        let grown = try waitFor(seconds: 60) { $0.balloonMiB == 0 }
        #expect(grown.balloonMiB == 0 && grown.memoryTargetMiB == 768, "\(grown)")
        #expect(guestAvailableMiB() > 600)

        let tooSmall = machine(["memory", "box", "8"])
        #expect(tooSmall.status != 0 && tooSmall.stderr.contains("below the 32 MiB"), "\(tooSmall.stderr)")
        #expect(machine(["stop", "box"]).status == 0)
        let stopped = machine(["memory", "box", "256"])
        #expect(stopped.status != 0 && stopped.stderr.contains("not running"), "\(stopped.stderr)")
    }
}
