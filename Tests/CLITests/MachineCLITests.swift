import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet machine` without booting anything: names, records, states told from the VMM
/// process's lock and pid file, and the errors a user gets for machines that are not there, not
/// running, or running.
@Suite struct MachineCLITests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func run(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 60)
    }

    /// A machine whose root is a stand-in file (nothing boots here).
    func create(_ name: String) -> Subprocess {
        let rootfs = home.write("root-\(name).img", Array(repeating: 0, count: 4096))
        return run(["create", "--name", name, "--rootfs", rootfs, "--cpus", "2", "--memory", "64", "--disk-size", "64"])
    }

    func machineDirectory(_ name: String) -> String { home.path + "/machines/" + name }

    /// A row of `machine ls`'s table: its columns are apart by two spaces or more.
    func columns(_ line: Substring) -> [String] {
        var cells: [String] = [], cell = "", spaces = 0
        for character in line {
            if character == " " { spaces += 1; continue }
            if spaces >= 2, !cell.isEmpty { cells.append(cell); cell = "" } else if spaces == 1 { cell += " " }
            spaces = 0
            cell.append(character)
        }
        if !cell.isEmpty { cells.append(cell) }
        return cells
    }

    @Test func createRecordsTheMachineAndRefusesBadOrTakenNames() throws {
        let made = create("web-1")
        #expect(made.status == 0 && made.stderr.contains("created machine web-1"), "\(made.stderr)")
        let disk = machineDirectory("web-1") + "/disk.img"
        var info = stat()
        #expect(stat(disk, &info) == 0 && info.st_size == 64 << 20 && info.st_blocks * 512 < 64 << 20, "a sparse 64 MiB disk")
        #expect(Subprocess.run(["/bin/sh", "-c", "LC_ALL=C /sbin/dumpe2fs -h \"$0\" 2>/dev/null | grep -c 'has_journal'", disk]).stdout == "1\n",
                "formatted as ext4 with a journal")
        let record = try OwnedFileDescriptor.readSmallTextFile(machineDirectory("web-1") + "/machine.json")

        let again = create("web-1")
        #expect(again.status == 1 && again.stderr.contains("a machine named web-1 already exists"), "\(again.stderr)")
        #expect(try OwnedFileDescriptor.readSmallTextFile(machineDirectory("web-1") + "/machine.json") == record, "the first machine is untouched")
        for bad in ["-x", "a b", "../up", String(repeating: "n", count: 64), "ü"] {
            let r = run(["create", "--name=" + bad])
            #expect(r.status != 0 && r.stderr.contains("is not a machine name"), "\(bad): \(r.stderr)")
        }
        let missing = run(["create", "--name", "nokernel", "--rootfs", home.path + "/nope.img"])
        #expect(missing.status == 1 && missing.stderr.contains("no root filesystem image"), "\(missing.stderr)")
        #expect(access(machineDirectory("nokernel"), F_OK) != 0, "a failed create leaves nothing behind")
        #expect(run(["create", "--name", "x", "--disk-size", "1"]).stderr.contains("--disk-size must be"))
        let noKernel = run(["create", "--name", "nokernel", "--rootfs", home.write("root.img", [0]), "--kernel", home.path + "/vmlinux"])
        #expect(noKernel.status == 1 && noKernel.stderr.contains("no kernel at"), "\(noKernel.stderr)")
        #expect(access(machineDirectory("nokernel"), F_OK) != 0, "a failed create leaves nothing behind")
        #expect(run(["create", "--name", "x", "--cpus", "0"]).stderr.contains("--cpus must be 1 to"))
        #expect(run(["create", "--name", "x", "--memory", "8"]).stderr.contains("--memory must be at least"))
        #expect(run(["start", "web-1", "--timeout", "soon"]).stderr.contains("--timeout soon: expected a duration"))
        #expect(run(["stop", "web-1", "--timeout=-1s"]).stderr.contains("expected a duration"))
        #expect(run(["start", "web-1", "--timeout", "inf"]).stderr.contains("--timeout inf: expected a duration"))
        #expect(run(["restore", "./snap", "--name", "web-2", "--timeout", "1e300s"]).stderr.contains("expected a duration"))

        let list = run(["ls", "--json"])
        #expect(list.stdout.contains("\"name\":\"web-1\"") && list.stdout.contains("\"state\":\"stopped\"") && list.stdout.contains("\"cpus\":2"), "\(list.stdout)")
        let status = run(["status", "web-1"])
        #expect(status.status == 0 && status.stdout.contains("state: stopped") && status.stdout.contains("memory: 64 MiB"), "\(status.stdout)")
    }

    @Test func networkFlagsAreRecordedAndShownAndBadOnesLeaveNothingBehind() throws {
        let rootfs = home.write("root-net.img", Array(repeating: 0, count: 4096))
        func create(_ name: String, _ flags: [String]) -> Subprocess {
            run(["create", "--name", name, "--rootfs", rootfs, "--memory", "64", "--disk-size", "64"] + flags)
        }
        let made = create("api", ["--allow-host", "api.example.com", "--allow-cidr", "10.1.0.0/16", "-p", "8080:80", "-p", "0.0.0.0:5353:53/udp"])
        #expect(made.status == 0 && made.stderr.contains("network: allow api.example.com, 10.1.0.0/16; ports 127.0.0.1:8080:80/tcp, 0.0.0.0:5353:53/udp"),
                "\(made.stderr)")
        #expect(create("open", ["--net"]).status == 0)
        #expect(create("inbound", ["-p", "9090:90"]).status == 0)
        #expect(create("plain", []).status == 0)

        // The table: one row per machine, NETWORK and PORTS last.
        let table = run(["ls"]).stdout.split(separator: "\n").map(columns)
        #expect(table.first == ["NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "NETWORK", "PORTS"], "\(table)")
        let rows = Dictionary(table.dropFirst().map { ($0[0], Array($0.suffix(2))) }, uniquingKeysWith: { a, _ in a })
        #expect(rows["api"] == ["allow api.example.com, 10.1.0.0/16", "127.0.0.1:8080:80/tcp,0.0.0.0:5353:53/udp"], "\(table)")
        #expect(rows["open"] == ["open", "-"] && rows["inbound"] == ["inbound only", "127.0.0.1:9090:90/tcp"] && rows["plain"] == ["none", "-"], "\(table)")
        let status = run(["status", "api"]).stdout
        #expect(status.contains("network: allow api.example.com, 10.1.0.0/16\nports: 127.0.0.1:8080:80/tcp, 0.0.0.0:5353:53/udp"), "\(status)")
        #expect(run(["status", "plain"]).stdout.contains("network: none\n"))
        let json = run(["ls", "--json"]).stdout
        #expect(json.contains("\"network\":\"inbound only\"") && json.contains("\"ports\":[\"127.0.0.1:9090:90/tcp\"]"), "\(json)")

        // Bad flags: one clear line each, and no machine left behind.
        for (flags, text) in [(["-p", "8080:80", "-p", "127.0.0.1:8080:81"], "host port 8080/tcp is published twice"),
                              (["--allow-host", "192.0.2.1"], "is an address, not a host name"),
                              (["--allow-cidr", "10.0.0.0/33"], "10.0.0.0/33"),
                              (["-p", "70000:80"], "70000"),
                              (["-p", "8080"], "8080")] {
            let r = create("bad", flags)
            #expect(r.status != 0 && r.stderr.contains(text), "\(flags): \(r.stderr)")
            #expect(access(machineDirectory("bad"), F_OK) != 0, "\(flags): a refused create leaves nothing behind")
        }
        // The same check on `run`, before anything boots.
        let twice = Subprocess.run([swiftlet, "run", "-p", "8080:80", "-p", "8080:80", "--", "true"], environment: ["SWIFTLET_HOME": home.path])
        #expect(twice.status != 0 && twice.stderr.contains("host port 8080/tcp is published twice"), "\(twice.stderr)")
        #expect(Subprocess.run([swiftlet, "run", "-p", "8080:80/udp", "-p", "8080:80", "--", "true"], environment: ["SWIFTLET_HOME": home.path])
                    .stderr.contains("published twice") == false, "one port over TCP and UDP is two publications")
    }

    @Test func volumesAreRecordedAndShownAndBadOnesLeaveNothingBehind() throws {
        let rootfs = home.write("root-vol.img", Array(repeating: 0, count: 4096))
        let shared = home.path + "/shared"
        mkdir(shared, 0o755)
        func create(_ name: String, _ flags: [String]) -> Subprocess {
            run(["create", "--name", name, "--rootfs", rootfs, "--memory", "64", "--disk-size", "64"] + flags)
        }
        let made = create("dev", ["-v", shared + ":/work", "--volume", shared + ":/ref:ro"])
        #expect(made.status == 0, "\(made.stderr)")
        let status = run(["status", "dev"]).stdout
        #expect(status.contains("volumes: \(shared):/work, \(shared):/ref:ro"), "\(status)")
        let json = run(["status", "dev", "--json"]).stdout
        #expect(json.contains("\"volumes\":[") && (json.contains(":/work") || json.contains(":\\/work")), "\(json)")
        // A relative host directory is taken from the current directory.
        let relative = Subprocess.run(["/bin/sh", "-c", "cd \"$0\" && exec \"$1\" machine create --name rel --rootfs \"$2\" --disk-size 64 -v shared:/w",
                                       home.path, swiftlet, rootfs], environment: ["SWIFTLET_HOME": home.path], timeout: 60)
        #expect(relative.status == 0, "\(relative.stderr)")
        #expect(run(["status", "rel"]).stdout.contains("volumes: \(shared):/w"))

        // Bad volumes: one clear line each, and no machine left behind.
        for (flags, text) in [(["-v", shared], "expected HOST_DIR:GUEST_DIR"),
                              (["-v", shared + ":relative"], "use an absolute path"),
                              (["-v", shared + ":/"], "use an absolute path"),
                              (["-v", shared + ":/a/../etc"], "without . or .."),
                              (["-v", shared + ":/proc/x"], "/proc, /sys and /dev"),
                              (["-v", shared + ":/dev"], "/proc, /sys and /dev"),
                              (["-v", home.path + "/missing:/x"], "missing"),
                              (["-v", rootfs + ":/x"], "not a directory"),
                              (["-v", shared + ":/x:rx"], "expected HOST_DIR:GUEST_DIR"),
                              (["-v", shared + ":/x", "-v", shared + ":/x/"], "two volumes at /x")] {
            let r = create("bad", flags)
            #expect(r.status != 0 && r.stderr.contains(text), "\(flags): \(r.stderr)")
            #expect(access(machineDirectory("bad"), F_OK) != 0, "\(flags): a refused create leaves nothing behind")
        }
        let seventeen = (0..<17).flatMap { ["-v", shared + ":/v\($0)"] }
        #expect(create("bad", seventeen).stderr.contains("17 volumes are more than"))
        // --from (a pack's machine) and run --from (a snapshot's) keep the devices they had.
        #expect(run(["create", "--name", "p", "--from", home.path + "/x.swiftlet", "-v", shared + ":/w"]).stderr.contains("--volume needs a machine that boots"))
        let fromSnapshot = Subprocess.run([swiftlet, "run", "--from", home.path + "/snap", "-v", shared + ":/w", "--", "true"],
                                          environment: ["SWIFTLET_HOME": home.path])
        #expect(fromSnapshot.status != 0 && fromSnapshot.stderr.contains("--volume needs a machine that boots"), "\(fromSnapshot.stderr)")
        let runBad = Subprocess.run([swiftlet, "run", "-v", home.path + "/missing:/x", "--", "true"], environment: ["SWIFTLET_HOME": home.path])
        #expect(runBad.status != 0 && runBad.stderr.contains("missing"), "\(runBad.stderr)")
    }

    @Test func commandsOnMissingOrStoppedMachinesSaySo() {
        for command in [["start", "ghost"], ["stop", "ghost"], ["status", "ghost"], ["rm", "ghost"], ["exec", "ghost", "--", "true"],
                        ["pause", "--name", "ghost"], ["shell", "ghost"]] {
            let r = run(command)
            #expect(r.status == 1 && r.stderr.contains("no machine named ghost"), "\(command): \(r.stderr)")
        }
        #expect(create("idle").status == 0)
        for command in [["exec", "idle", "--", "true"], ["pause", "idle"], ["resume", "idle"]] {
            let r = run(command)
            #expect(r.status == 1 && r.stderr.contains("machine idle is not running: start it"), "\(command): \(r.stderr)")
        }
        let copy = run(["cp", "/etc/hostname", "idle:/tmp/x"])
        #expect(copy.status == 1 && copy.stderr.contains("machine idle is not running"), "\(copy.stderr)")
        #expect(run(["cp", "/etc/hostname", "/tmp/x"]).stderr.contains("one side must be a machine's absolute path"))
        #expect(run(["cp", "idle:/a", "idle:/b"]).stderr.contains("one side must be a host path"))
        #expect(run(["cp", home.path + "/nope", "idle:/tmp/x"]).stderr.contains("nope"))
        let stop = run(["stop", "idle"])
        #expect(stop.status == 0 && stop.stderr.contains("is not running"), "\(stop.stderr)")
        let both = run(["status", "idle", "--name", "other"])
        #expect(both.status == 64 && both.stderr.contains("give the machine's name once"), "\(both.stderr)")
        #expect(run(["status"]).stderr.contains("which machine?"))
        let removed = run(["rm", "idle"])
        #expect(removed.status == 0 && access(machineDirectory("idle"), F_OK) != 0, "\(removed.stderr)")
    }

    @Test func aRunningMachineIsNotRemovedWithoutForce() throws {
        #expect(create("busy").status == 0)
        // The machine's VMM process holds its lock while it runs: hold it here instead.
        let lock = open(machineDirectory("busy") + "/lock", O_RDWR | O_CREAT, 0o600)
        defer { close(lock) }
        #expect(flock(lock, LOCK_EX) == 0)
        _ = home.write("machines/busy/vmm.pid", Array("\(getpid())\n".utf8))
        let rm = run(["rm", "busy"])
        #expect(rm.status == 1 && rm.stderr.contains("machine busy is running: stop it first"), "\(rm.stderr)")
        #expect(access(machineDirectory("busy") + "/machine.json", F_OK) == 0 && access(machineDirectory("busy") + "/disk.img", F_OK) == 0)
        let start = run(["start", "busy"])
        #expect(start.status == 1 && start.stderr.contains("machine busy is already running"), "\(start.stderr)")
        #expect(run(["ls"]).stdout.contains("busy  starting"), "no control socket answers yet")
    }

    @Test func aVMMProcessThatDiedIsReportedAsACrash() throws {
        #expect(create("gone").status == 0)
        // A pid file nobody cleaned up, and no process holding the lock: the VMM process died.
        _ = home.write("machines/gone/vmm.pid", Array("4242\n".utf8))
        _ = home.write("machines/gone/vmm.log", Array("swiftlet: last words\n".utf8))
        let status = run(["status", "gone"])
        #expect(status.stdout.contains("state: crashed") && status.stdout.contains("VMM process (pid 4242) ended without stopping the machine"), "\(status.stdout)")
        #expect(status.stdout.contains("last words"), "the VMM log's tail is shown")
        let exec = run(["exec", "gone", "--", "true"])
        #expect(exec.status == 1 && exec.stderr.contains("machine gone crashed"), "\(exec.stderr)")
        #expect(run(["ls"]).stdout.contains("gone  crashed"))
        let stop = run(["stop", "gone"])
        #expect(stop.stderr.contains("crashed") && access(machineDirectory("gone") + "/vmm.pid", F_OK) != 0, "stop clears the stale pid file: \(stop.stderr)")
        #expect(run(["status", "gone"]).stdout.contains("state: stopped"))
    }

    @Test func snapshotRestoreAndForkRefuseWhatTheyCannotDo() {
        #expect(create("idle").status == 0)
        let snapshot = run(["snapshot", "idle", "-o", home.path + "/snap"])
        #expect(snapshot.status == 1 && snapshot.stderr.contains("machine idle is not running"), "\(snapshot.stderr)")
        #expect(access(home.path + "/snap", F_OK) != 0)
        #expect(run(["snapshot", "idle"]).stderr.contains("Missing expected argument '--output"))
        _ = home.write("taken", [1])
        #expect(run(["snapshot", "idle", "-o", home.path + "/taken"]).stderr.contains("already exists: snapshots go to a new directory"))

        let fork = run(["fork", "--from", "idle", "--name", "copy"])
        #expect(fork.status == 1 && fork.stderr.contains("machine idle is not running: fork copies a running machine"), "\(fork.stderr)")
        #expect(access(machineDirectory("copy"), F_OK) != 0 && access(machineDirectory("idle") + "/machine.json", F_OK) == 0)
        #expect(run(["fork", "--from", "ghost", "--name", "copy"]).stderr.contains("no machine named ghost"))
        #expect(run(["fork", "--from", "idle", "--name", "copy", "--count", "0"]).stderr.contains("--count must be 1 to 1024"))
        #expect(run(["fork", "--from", "idle", "--name", "a b"]).stderr.contains("is not a machine name"))
        // --from with a slash is a snapshot directory: one that is not a machine's snapshot is refused.
        let notSnapshotFork = run(["fork", "--from", machineDirectory("idle"), "--name", "copy"])
        #expect(notSnapshotFork.status == 1 && notSnapshotFork.stderr.contains("is not a Swiftlet snapshot"), "\(notSnapshotFork.stderr)")
        // A name that is no machine but a directory here: said how to give it.
        let bare = Subprocess.run(["/bin/sh", "-c", "cd \"$0\" && exec \"$1\" machine fork --from machines --name copy", home.path, swiftlet],
                                  environment: ["SWIFTLET_HOME": home.path])
        #expect(bare.status == 1 && bare.stderr.contains("give it as ./machines"), "\(bare.stderr)")
        #expect(access(machineDirectory("copy"), F_OK) != 0)
        #expect((OwnedFileDescriptor.directoryEntries(home.path + "/machines/.forks") ?? []).isEmpty, "nothing left behind")

        let missing = run(["restore", home.path + "/nothing", "--name", "back"])
        #expect(missing.status == 1 && missing.stderr.contains("snapshot \(home.path)/nothing does not exist"), "\(missing.stderr)")
        let notSnapshot = run(["restore", machineDirectory("idle"), "--name", "back"])
        #expect(notSnapshot.status == 1 && notSnapshot.stderr.contains("is not a Swiftlet snapshot"), "\(notSnapshot.stderr)")
        _ = Subprocess.run(["/bin/mkdir", "-p", home.path + "/bad"])
        _ = home.write("bad/state", Array("not a state file".utf8))
        let damaged = run(["restore", home.path + "/bad", "--name", "back"])
        #expect(damaged.status == 1 && !damaged.stderr.isEmpty, "\(damaged.stderr)")
        #expect(access(machineDirectory("back"), F_OK) != 0, "a failed restore leaves no machine")
    }

    /// A fork's clones share a disk kept in machines/.forks/ID; it goes with the last of them.
    @Test func aForksSharedDiskGoesWithItsLastClone() throws {
        #expect(create("clone-1").status == 0 && create("clone-2").status == 0 && create("plain").status == 0)
        let base = home.path + "/machines/.forks/0123456789abcdef"
        _ = Subprocess.run(["/bin/mkdir", "-p", base, home.path + "/machines/.forks/fedcba9876543210"])
        _ = home.write("machines/.forks/0123456789abcdef/disk-1", [0])
        _ = home.write("machines/.forks/fedcba9876543210/disk-1", [0])
        for clone in ["clone-1", "clone-2"] {
            let path = machineDirectory(clone) + "/machine.json"
            let record = try OwnedFileDescriptor.readSmallTextFile(path)
            let edited = record.split(separator: "\n", omittingEmptySubsequences: false)
                .map { $0.contains("\"cpus\"") ? "  \"diskBase\" : \"\(base)/disk-1\",\n" + $0 : String($0) }.joined(separator: "\n")
            _ = home.write("machines/\(clone)/machine.json", Array(edited.utf8))
        }
        #expect(run(["rm", "plain"]).status == 0)
        #expect(access(home.path + "/machines/.forks/fedcba9876543210", F_OK) != 0, "a base no machine uses is removed")
        #expect(access(base + "/disk-1", F_OK) == 0)
        #expect(run(["rm", "clone-1"]).status == 0)
        #expect(access(base + "/disk-1", F_OK) == 0, "clone-2 still uses it")
        #expect(run(["rm", "clone-2"]).status == 0)
        #expect(access(base, F_OK) != 0)
    }

    /// `image rm` and `image prune` keep the layer disks a machine boots from: the machine still
    /// has its root, and the disks go with a prune once the last machine using them is removed.
    @Test(.enabled(if: TestImages.directory != nil, "scripts/build-test-images could not build the test images"))
    func imageRemovalKeepsTheDisksMachinesUse() throws {
        let layout = TestImages.path("layout")
        let made = run(["create", "--name", "app", "--image", layout, "--disk-size", "64"])
        #expect(made.status == 0, "\(made.stderr)")
        let record = try OwnedFileDescriptor.readSmallTextFile(machineDirectory("app") + "/machine.json")
        let disks = Subprocess.run(["/bin/ls", home.path + "/disks/sha256"]).stdout.split(separator: "\n").map { home.path + "/disks/sha256/" + $0 }
        #expect(disks.count == 2 && disks.allSatisfy { record.contains($0.split(separator: "/").last!) }, "\(disks) \(record)")
        func image(_ arguments: [String]) -> Subprocess {
            Subprocess.run([swiftlet, "image"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 60)
        }
        // An OCI layout comes in unnamed: removed by its manifest digest.
        let listed = image(["ls", "--json"]).stdout
        let manifest = try #require(listed.split(separator: "\"").drop { $0 != "manifest" }.dropFirst(2).first, "\(listed)")
        let removed = image(["rm", String(manifest)])
        #expect(removed.status == 0 && image(["ls", "--json"]).stdout.contains(String(manifest)) == false, "\(removed.stderr)")
        #expect(image(["prune"]).status == 0)
        #expect(disks.allSatisfy { access($0, R_OK) == 0 }, "the machine's layer disks stay")
        #expect(run(["rm", "app"]).status == 0)
        #expect(image(["prune"]).status == 0)
        #expect(disks.allSatisfy { access($0, F_OK) != 0 }, "no machine uses them any more")
    }
}
