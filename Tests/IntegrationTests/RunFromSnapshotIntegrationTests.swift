import FoundationEssentials
import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet snapshot` and `swiftlet run --from`: a machine saved when its agent was ready, then
/// started from there again and again; the agent reconnects after each restore.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct RunFromSnapshotIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()

    func swiftlet(_ arguments: [String], home: String? = nil) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: home.map { ["SWIFTLET_HOME": $0] } ?? [:], timeout: 300)
    }

    /// sha256sum's digest (the tests are a debug build: hashing 128 MiB in Swift would take minutes
    /// in the emulated test host).
    func digest(_ path: String) -> String {
        let r = Subprocess.run(["/bin/sh", "-c", "sha256sum \"$0\"", path])
        return String(r.stdout.prefix(64))
    }

    @Test func commandsRunInRestoresOfOneSnapshotEachFromTheSameState() throws {
        let snapshot = dir.path + "/busybox.snap"
        let made = swiftlet(["snapshot", "--memory", "128", "-o", snapshot])
        #expect(made.status == 0, "\(made.stderr)")
        #expect(made.stderr.contains("snapshot ") && made.stdout.isEmpty, "\(made.stderr)")
        let state = digest(snapshot + "/state"), memory = digest(snapshot + "/memory")

        let first = swiftlet(["run", "--from", snapshot, "--", "sh", "-c", "echo out; echo err >&2; echo written > /etc/new-file; exit 7"])
        #expect(first.status == 7, "\(first.stderr)")
        #expect(first.stdout == "out\n" && first.stderr == "err\n", "\(first.stdout)\(first.stderr)")
        // The first run recorded the pages it wrote; the runs below copy them in before they start.
        let workingSet = snapshot + "/working-set"
        let recorded = try OwnedFileDescriptor.readSmallFile(workingSet)
        #expect(recorded.count > 72 && Array(recorded.prefix(8)) == Array("SWLTWSET".utf8))
        // The next restore starts from the snapshot again, not from where the last one ended.
        let second = swiftlet(["run", "--from", snapshot, "-e", "FOO=bar", "-w", "/tmp", "-u", "nobody", "--",
                               "sh", "-c", "test -e /etc/new-file || echo no-new-file; echo $FOO; pwd; id -u"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(second.stdout == "no-new-file\nbar\n/tmp\n65534\n")
        let input = Subprocess.run([swiftlet, "run", "--from", snapshot, "-i", "--", "tr", "a-z", "A-Z"], stdin: "from the host\n", timeout: 300)
        #expect(input.stdout == "FROM THE HOST\n", "\(input.stderr)")
        #expect(swiftlet(["run", "--from", snapshot, "--", "no-such-command"]).status == 127)
        #expect(digest(snapshot + "/state") == state && digest(snapshot + "/memory") == memory && state.count == 64, "restores never modify the snapshot")
        #expect(try OwnedFileDescriptor.readSmallFile(workingSet) == recorded, "recorded once, then only read")

        // A damaged working set is a missing hint: the run works and records it again.
        var damaged = recorded
        damaged[damaged.count - 1] ^= 0xFF
        _ = dir.write("busybox.snap/working-set", damaged)
        let afterDamage = swiftlet(["run", "--from", snapshot, "--", "echo", "still"])
        #expect(afterDamage.status == 0 && afterDamage.stdout == "still\n", "\(afterDamage.stderr)")
        let rewritten = try OwnedFileDescriptor.readSmallFile(workingSet)
        #expect(rewritten != damaged && Array(rewritten.prefix(36)) == Array(recorded.prefix(36)), "the same snapshot's header, a valid set again")

        // Bad snapshots: clear errors, and the good one is untouched.
        let flipped = dir.path + "/flipped"
        _ = Subprocess.run(["/bin/cp", "-r", snapshot, flipped])
        var bytes = try OwnedFileDescriptor.readSmallFile(flipped + "/state", limit: 64 << 20)
        bytes[bytes.count - 10] ^= 1
        _ = dir.write("flipped/state", bytes)
        let corrupt = swiftlet(["run", "--from", flipped, "--", "true"])
        #expect(corrupt.status == 1 && corrupt.stderr.contains("is corrupt"), "\(corrupt.stderr)")
        let truncated = dir.path + "/truncated"
        _ = Subprocess.run(["/bin/cp", "-r", snapshot, truncated])
        #expect(Glibc.truncate(truncated + "/memory", 1 << 20) == 0)
        let short = swiftlet(["run", "--from", truncated, "--", "true"])
        #expect(short.status == 1 && short.stderr.contains("truncated"), "\(short.stderr)")
        #expect(digest(snapshot + "/state") == state && digest(snapshot + "/memory") == memory && state.count == 64)
    }

    @Test(.enabled(if: TestImages.directory != nil, "needs the test images"))
    func anImagesConfigTravelsWithItsSnapshot() {
        let home = dir.path + "/home"
        // A directory name JSON must escape: the report still parses and names it.
        let snapshot = dir.path + "/image \"snap\\shot\""
        let made = swiftlet(["snapshot", "--image", TestImages.path("layout"), "-o", snapshot, "--json"], home: home)
        #expect(made.status == 0, "\(made.stderr)")
        struct Report: Decodable { var directory: String; var id: String; var bytesWritten: UInt64; var pausedMilliseconds: Double }
        let report = try? JSONDecoder().decode(Report.self, from: Data(made.stdout.utf8))
        #expect(report?.directory == snapshot && report?.id.count == 32 && (report?.bytesWritten ?? 0) > 0, "\(made.stdout)")
        let r = swiftlet(["run", "--from", snapshot], home: home)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "cwd=/srv from_image=yes\nhello from the image\n")
    }
}
