import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet machine snapshot|restore|fork`: a machine saved with its disk, made again under
/// another name, and copied while it runs; a process counting inside goes on in every copy
/// without skipping or repeating, and the copies diverge without seeing each other's writes.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct MachineSnapshotIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func machine(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 600)
    }

    func exec(_ name: String, _ line: String) -> Subprocess {
        machine(["exec", name, "--", "sh", "-c", line])
    }

    /// The counter's log in `name`: it must read 1, 2, 3, ... n with nothing missing or repeated; returns n.
    func unbrokenCount(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) -> Int {
        let lines = exec(name, "cat /root/log").stdout.split(separator: "\n").map { Int($0) ?? -1 }
        let broken = lines.enumerated().first { $0.element != $0.offset + 1 }
        #expect(!lines.isEmpty && broken == nil, "\(name)'s count breaks at line \((broken?.offset ?? 0) + 1): \(broken?.element ?? 0)",
                sourceLocation: sourceLocation)
        return lines.count
    }

    @Test func snapshotsRestoresAndForksOfARunningMachine() throws {
        #expect(machine(["create", "--name", "src", "--memory", "128"]).status == 0)
        #expect(machine(["start", "src"]).status == 0)
        // A counter in its own session, a file on the disk, and 4 MiB held in guest memory (tmpfs).
        #expect(exec("src", "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i >> /root/log; usleep 200000; done' </dev/null >/dev/null 2>&1 &").status == 0)
        #expect(exec("src", "echo before > /root/before; head -c 4194304 /dev/urandom > /dev/shm/blob").status == 0)
        let blobHash = exec("src", "sha256sum /dev/shm/blob").stdout
        #expect(blobHash.count > 64)
        usleep(1_500_000)

        let snapshot = home.path + "/snap"
        let taken = machine(["snapshot", "src", "-o", snapshot, "--json"])
        #expect(taken.status == 0 && taken.stdout.contains("\"memoryPagesWritten\""), "\(taken.stderr)")
        let countAtSnapshot = unbrokenCount("src")
        #expect(exec("src", "echo after > /root/after").status == 0)
        for file in ["state", "memory", "disk-\(1)"] where access(snapshot + "/" + file, F_OK) != 0 {
            Issue.record("the snapshot has no \(file)")
        }

        // Restore: the new machine continues the count, has the disk as it was, its own hostname.
        let restored = machine(["restore", snapshot, "--name", "back"])
        #expect(restored.status == 0 && restored.stderr.contains("restored machine back"), "\(restored.stderr)")
        #expect(exec("back", "hostname; cat /root/before; test -e /root/after || echo no-after").stdout == "back\nbefore\nno-after\n")
        #expect(exec("back", "sha256sum /dev/shm/blob").stdout == blobHash, "guest memory came back byte for byte")
        usleep(1_000_000)
        let restoredCount = unbrokenCount("back")
        #expect(restoredCount >= countAtSnapshot - 1, "the restored count goes on from the snapshot's (\(countAtSnapshot) → \(restoredCount))")
        #expect(machine(["status", "src"]).stdout.contains("state: running"), "the source runs on")
        #expect(exec("src", "cat /root/after").stdout == "after\n")

        // Bad input: a taken name, a damaged snapshot; the machines and the snapshot are untouched.
        let taken2 = machine(["restore", snapshot, "--name", "src"])
        #expect(taken2.status == 1 && taken2.stderr.contains("a machine named src already exists"), "\(taken2.stderr)")
        #expect(exec("src", "cat /root/before").stdout == "before\n")
        let damaged = home.path + "/damaged"
        _ = Subprocess.run(["/bin/cp", "-r", snapshot, damaged])
        _ = Subprocess.run(["/bin/sh", "-c", "printf '\\377' | dd of=\"$0\" bs=1 seek=100 conv=notrunc 2>/dev/null", damaged + "/state"])
        let refused = machine(["restore", damaged, "--name", "broken"])
        #expect(refused.status == 1 && access(home.path + "/machines/broken", F_OK) != 0, "\(refused.stderr)")

        // A diff snapshot of the restored machine, restored in turn.
        #expect(exec("back", "echo in-back > /root/back-file").status == 0)
        let diff = home.path + "/snap-diff"
        let diffTaken = machine(["snapshot", "back", "-o", diff, "--diff"])
        #expect(diffTaken.status == 0, "\(diffTaken.stderr)")
        #expect(machine(["restore", diff, "--name", "again"]).status == 0)
        #expect(exec("again", "cat /root/before /root/back-file; hostname").stdout == "before\nin-back\nagain\n")
        _ = unbrokenCount("again")

        // `run --from` starts a throwaway copy of a machine snapshot.
        let run = Subprocess.run([swiftlet, "run", "--from", snapshot, "--", "sh", "-c", "cat /root/before; echo x > /root/before"], timeout: 600)
        #expect(run.status == 0 && run.stdout == "before\n", "\(run.stderr)")
        #expect(machine(["restore", snapshot, "--name", "third"]).status == 0)
        #expect(exec("third", "cat /root/before").stdout == "before\n", "a run from the snapshot did not change it")

        // Two copies of the snapshot directory: they go on from the snapshot (not from the source's
        // now), each with its own writes over one shared copy of its disk; the snapshot stays whole.
        let fromSnapshot = machine(["fork", "--from", snapshot, "--name", "snapkid", "--count", "2"])
        #expect(fromSnapshot.status == 0 && fromSnapshot.stderr.contains("forked \(snapshot) into snapkid-1, snapkid-2"), "\(fromSnapshot.stderr)")
        for kid in ["snapkid-1", "snapkid-2"] {
            #expect(exec(kid, "hostname; cat /root/before; test -e /root/after || echo no-after").stdout == "\(kid)\nbefore\nno-after\n")
            #expect(exec(kid, "sha256sum /dev/shm/blob").stdout == blobHash)
            _ = unbrokenCount(kid)
        }
        #expect(exec("snapkid-1", "echo one > /root/mine").status == 0)
        #expect(exec("snapkid-2", "test -e /root/mine || echo none").stdout == "none\n")
        #expect(access(snapshot + "/memory", F_OK) == 0 && access(snapshot + "/disk-1", F_OK) == 0, "the snapshot keeps its files")
        for name in ["snapkid-1", "snapkid-2"] { #expect(machine(["rm", "-f", name]).status == 0) }

        // Fork three copies of the running source: each goes on counting, has its own name and
        // random numbers, and writes that no other copy sees.
        for name in ["back", "again", "third"] { #expect(machine(["rm", "-f", name]).status == 0) }
        let forked = machine(["fork", "--from", "src", "--name", "kid", "--count", "3", "--json"])
        #expect(forked.status == 0 && forked.stdout.contains("\"clones\":[\"kid-1\",\"kid-2\",\"kid-3\"]"), "\(forked.stdout)|\(forked.stderr)")
        let kids = ["kid-1", "kid-2", "kid-3"]
        // First thing after the fork (before the kernel's own periodic reseed could come), the
        // copies' kernel generators must already differ.
        let randoms = Set(kids.map { exec($0, "head -c 16 /dev/urandom | od -An -tx1").stdout })
        #expect(randoms.count == 3, "the clones' kernel random generators were reseeded apart: \(randoms)")
        for kid in kids {
            #expect(exec(kid, "hostname").stdout == "\(kid)\n")
            #expect(exec(kid, "echo \(kid) > /root/mine").status == 0)
        }
        usleep(1_000_000)
        for kid in kids {
            #expect(exec(kid, "cat /root/mine").stdout == "\(kid)\n")
            #expect(exec(kid, "cat /root/before /root/after").stdout == "before\nafter\n")
            #expect(exec(kid, "sha256sum /dev/shm/blob").stdout == blobHash)
            _ = unbrokenCount(kid)
        }
        #expect(exec("src", "test -e /root/mine || echo none").stdout == "none\n", "the source does not see its copies' writes")
        #expect(machine(["status", "src"]).stdout.contains("state: running"))
        let taken3 = machine(["fork", "--from", "src", "--name", "kid-1"])
        #expect(taken3.status == 1 && taken3.stderr.contains("a machine named kid-1 already exists"), "\(taken3.stderr)")

        // A copy survives a stop and start on its own disk (its overlay over the shared one).
        #expect(machine(["stop", "kid-2"]).status == 0)
        #expect(machine(["start", "kid-2"]).status == 0)
        #expect(exec("kid-2", "cat /root/mine /root/before; hostname").stdout == "kid-2\nbefore\nkid-2\n")

        for name in kids + ["src"] { #expect(machine(["rm", "-f", name]).status == 0) }
        #expect((OwnedFileDescriptor.directoryEntries(home.path + "/machines/.forks") ?? []).isEmpty, "the shared disk went with the last copy")
    }

    /// 64 copies of one running machine, each writing its own data: none sees another's.
    @Test func sixtyFourForksKeepTheirWritesApart() throws {
        #expect(machine(["create", "--name", "many", "--memory", "128"]).status == 0)
        #expect(machine(["start", "many"]).status == 0)
        #expect(exec("many", "echo shared > /root/shared").status == 0)
        let forked = machine(["fork", "--from", "many", "--name", "f", "--count", "64"])
        #expect(forked.status == 0, "\(forked.stderr)")
        let names = (1...64).map { "f-\($0)" }
        for name in names {
            #expect(exec(name, "echo \(name) > /root/mine; cat /root/shared").stdout == "shared\n", "\(name)")
        }
        for name in names {
            #expect(exec(name, "cat /root/mine; hostname").stdout == "\(name)\n\(name)\n")
        }
        #expect(exec("many", "test -e /root/mine || echo none").stdout == "none\n")
        for name in names + ["many"] { #expect(machine(["rm", "-f", name]).status == 0) }
        #expect((OwnedFileDescriptor.directoryEntries(home.path + "/machines/.forks") ?? []).isEmpty)
    }
}
