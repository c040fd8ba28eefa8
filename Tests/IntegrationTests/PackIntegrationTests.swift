import FoundationEssentials
import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet pack`: a snapshot packed into one file runs from another `SWIFTLET_HOME` (an empty
/// image store: nothing of the first home is used), with its memory, disks and image; the file
/// is left as it was; a damaged or cut pack is refused and leaves nothing behind.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct PackIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()
    var home: String { dir.path + "/home" }
    /// Where the packs run: a home that has never pulled or made anything.
    var elsewhere: String { dir.path + "/elsewhere" }

    func swiftlet(_ arguments: [String], home: String, stdin: String? = nil) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: ["SWIFTLET_HOME": home], stdin: stdin, timeout: 600)
    }

    func digest(_ path: String) -> String {
        String(Subprocess.run(["/bin/sh", "-c", "sha256sum \"$0\"", path]).stdout.prefix(64))
    }

    /// Nothing left in `home`'s unpack area, and no image in its store.
    func leftNothing(in home: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect((OwnedFileDescriptor.directoryEntries(home + "/unpacked") ?? []).isEmpty, "unpacked packs are removed", sourceLocation: sourceLocation)
        #expect((OwnedFileDescriptor.directoryEntries(home + "/disks/sha256") ?? []).isEmpty, "nothing of a pack goes into the image store",
                sourceLocation: sourceLocation)
    }

    @Test(.enabled(if: TestImages.directory != nil, "needs the test images"))
    func anImageSnapshotsPackRunsElsewhereWithTheImagesCommand() throws {
        let snapshot = dir.path + "/image.snap", pack = dir.path + "/image.swiftlet"
        let made = swiftlet(["snapshot", "--image", TestImages.path("layout"), "-o", snapshot], home: home)
        try #require(made.status == 0, "\(made.stderr)")
        let packed = swiftlet(["pack", "create", "--from", snapshot, "-o", pack], home: home)
        #expect(packed.status == 0 && packed.stdout.contains("parts"), "\(packed.stderr)")
        let inspected = swiftlet(["pack", "inspect", pack], home: elsewhere)
        #expect(inspected.status == 0 && inspected.stdout.contains("kind: snapshot") && inspected.stdout.contains("layer-sha256-")
                    && inspected.stdout.contains("memory") && inspected.stdout.contains("state"), "\(inspected.stdout)\(inspected.stderr)")
        let before = digest(pack)

        let run = swiftlet(["run", "--image", pack], home: elsewhere)
        #expect(run.status == 0 && run.stdout == "cwd=/srv from_image=yes\nhello from the image\n", "\(run.stdout)\(run.stderr)")
        let environment = swiftlet(["run", "--image", pack, "-e", "FROM_RUN=yes"], home: elsewhere)
        #expect(environment.status == 0 && environment.stdout.hasPrefix("cwd=/srv"), "\(environment.stdout)\(environment.stderr)")
        #expect(digest(pack) == before, "a run leaves the pack as it was")
        let verified = swiftlet(["pack", "verify", pack], home: elsewhere)
        #expect(verified.status == 0 && verified.stdout.contains("intact"), "\(verified.stderr)")
        leftNothing(in: elsewhere)
        // The machine a pack holds is its own: shaping it is refused.
        let shaped = swiftlet(["run", "--image", pack, "--memory", "512", "--", "true"], home: elsewhere)
        #expect(shaped.status != 0 && shaped.stderr.contains("is a pack"), "\(shaped.stderr)")
    }

    /// A snapshot pack's memory is not unpacked for a run: the restored guest's pages come from
    /// the pack as it touches them (userfaultfd; the nested host's test process is root), and the
    /// run reads and writes its memory as before.
    @Test func aPacksMemoryIsReadLazilyNotUnpacked() throws {
        let snapshot = dir.path + "/lazy.snap", pack = dir.path + "/lazy.swiftlet"
        try #require(swiftlet(["snapshot", "--memory", "512", "-o", snapshot], home: home).status == 0)
        try #require(swiftlet(["pack", "create", "--from", snapshot, "-o", pack], home: home).status == 0)
        // While a run sleeps: what its unpacked directory holds, and how much of the VMM's memory is anonymous.
        let script = """
            "$0" run --image "$1" -- sh -c 'head -c 16000000 /dev/zero | md5sum; sleep 4' &
            for i in $(seq 600); do ls "$2"/unpacked/*/snapshot 2>/dev/null | grep -q state && break; sleep 0.1; done
            sleep 2; ls "$2"/unpacked/*/snapshot; grep RssAnon /proc/$!/status; wait $!
            """
        let r = Subprocess.run(["/bin/sh", "-c", script, swiftlet, pack, elsewhere], environment: ["SWIFTLET_HOME": elsewhere], timeout: 600)
        #expect(r.status == 0 && r.stdout.contains("state") && !r.stdout.contains("memory"), "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("d8cb860ac8d564afab54d6dbebecd746  -"), "the guest computes as before: \(r.stdout)")
        let anonymous = r.stdout.split(separator: "\n").first { $0.hasPrefix("RssAnon:") }
            .flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? Int.max
        #expect(anonymous < 400 << 10, "a 512 MiB machine's untouched memory is not resident: \(anonymous) kB")
        leftNothing(in: elsewhere)

        // A run killed outright leaves its unpacked copy; the next run removes it.
        let killed = """
            "$0" run --image "$1" -- sleep 120 &
            pid=$!
            for i in $(seq 600); do ls "$2"/unpacked/*/snapshot 2>/dev/null | grep -q state && break; sleep 0.1; done
            kill -KILL $pid; wait $pid
            echo "left: $(ls "$2"/unpacked | wc -l)"
            "$0" run --image "$1" -- true && echo "after: $(ls "$2"/unpacked | wc -l)"
            """
        let k = Subprocess.run(["/bin/sh", "-c", killed, swiftlet, pack, elsewhere], environment: ["SWIFTLET_HOME": elsewhere], timeout: 600)
        #expect(k.stdout.contains("left: 2\n") && k.stdout.contains("after: 0\n"), "\(k.stdout)\(k.stderr)")

        // Every stored memory chunk but the first (the header's) damaged: the first page the guest
        // touches in one ends the run, naming the chunk; nothing it would have printed is printed.
        let json = swiftlet(["pack", "inspect", "--json", pack], home: elsewhere).stdout
        struct Chunk: Decodable { var encoding: String; var offset: UInt64; var length: UInt64 }
        struct Part: Decodable { var name: String; var chunks: [Chunk] }
        struct Manifest: Decodable { var parts: [Part] }
        let memory = try #require(try JSONDecoder().decode(Manifest.self, from: Data(json.utf8)).parts.first { $0.name == "memory" })
        var bytes = try OwnedFileDescriptor.readSmallFile(pack, limit: 512 << 20)
        for chunk in memory.chunks.filter({ $0.encoding != "zero" }).dropFirst() { bytes[Int(chunk.offset + chunk.length / 2)] ^= 0x01 }
        let damaged = dir.write("lazy-damaged.swiftlet", bytes)
        let refused = swiftlet(["run", "--image", damaged, "--", "echo", "ran"], home: elsewhere)
        #expect(refused.status != 0 && !refused.stdout.contains("ran") && refused.stderr.contains("the machine's memory could not be read: chunk ")
                    && refused.stderr.contains("of part memory of \(damaged) is damaged"), "\(refused.status) \(refused.stdout)\(refused.stderr)")
        leftNothing(in: elsewhere)
    }

    @Test(.enabled(if: TestImages.directory != nil, "needs the test images"))
    func anImagesPackBootsElsewhereWithItsOwnKernelAndCommand() throws {
        let pack = dir.path + "/layout.swiftlet"
        let made = swiftlet(["pack", "create", "--image", TestImages.path("layout"), "-o", pack], home: home)
        try #require(made.status == 0, "\(made.stderr)")
        let inspected = swiftlet(["pack", "inspect", pack], home: elsewhere).stdout
        #expect(inspected.contains("kind: image") && inspected.contains("kernel") && inspected.contains("agent")
                    && inspected.contains("layer-sha256-"), "\(inspected)")
        let run = swiftlet(["run", "--image", pack], home: elsewhere)
        #expect(run.status == 0 && run.stdout == "cwd=/srv from_image=yes\nhello from the image\n", "\(run.stdout)\(run.stderr)")
        let environment = swiftlet(["run", "--image", pack, "-e", "FROM_RUN=1"], home: elsewhere)
        #expect(environment.status == 0 && environment.stdout.hasPrefix("cwd=/srv"), "\(environment.stdout)\(environment.stderr)")
        // The first run saved a boot template of the pack's kernel and agent, keyed by their
        // digests (each run unpacks them anew), which the second restored.
        let templates = (OwnedFileDescriptor.directoryEntries(elsewhere + "/templates") ?? []).filter { $0.isDirectory && !$0.name.contains(".") }
        #expect(templates.count == 1, "\(templates)")
        let inputs = templates.first.flatMap { try? OwnedFileDescriptor.readSmallTextFile(elsewhere + "/templates/" + $0.name + "/inputs") } ?? ""
        #expect(inputs.components(separatedBy: "contents pack-part-sha256:").count == 3, "the kernel and the agent by digest: \(inputs)")
        // Without a source: the default image. As a program, in an empty environment.
        let program = dir.path + "/default-image-app"
        let packed = swiftlet(["pack", "create", "-o", program, "--executable"], home: home)
        try #require(packed.status == 0, "\(packed.stderr)")
        let ran = Subprocess.run(["/bin/sh", "-c", "cd / && exec env -i \"$0\" -- sh -c 'echo $0; exit 2' packed", program], timeout: 600)
        #expect(ran.status == 2 && ran.stdout == "packed\n", "\(ran.stdout)\(ran.stderr)")
        let machine = swiftlet(["machine", "create", "--name", "img", "--from", pack], home: elsewhere)
        #expect(machine.status == 1 && machine.stderr.contains("is a pack of an image"), "\(machine.stderr)")
        #expect(access(elsewhere + "/machines/img", F_OK) != 0)
        leftNothing(in: elsewhere)
    }

    @Test func aRunningMachinesPackCarriesItsMemoryDiskAndProcessesElsewhere() throws {
        func machine(_ arguments: [String]) -> Subprocess { swiftlet(["machine"] + arguments, home: home) }
        func exec(_ line: String) -> Subprocess { machine(["exec", "src", "--", "sh", "-c", line]) }
        try #require(machine(["create", "--name", "src", "--memory", "128"]).status == 0)
        try #require(machine(["start", "src"]).status == 0)
        defer { _ = machine(["stop", "src"]) }
        // A counter in its own session, a file on the disk, 4 MiB in guest memory (tmpfs).
        #expect(exec("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i >> /root/log; usleep 200000; done' </dev/null >/dev/null 2>&1 &").status == 0)
        #expect(exec("echo on-disk > /root/file; head -c 4194304 /dev/urandom > /dev/shm/blob").status == 0)
        let blob = exec("sha256sum /dev/shm/blob").stdout
        usleep(1_000_000)
        let snapshot = dir.path + "/machine.snap", pack = dir.path + "/machine.swiftlet"
        let taken = machine(["snapshot", "src", "-o", snapshot])
        try #require(taken.status == 0, "\(taken.stderr)")
        let packed = swiftlet(["pack", "create", "--from", snapshot, "-o", pack], home: home)
        try #require(packed.status == 0, "\(packed.stderr)")
        #expect(swiftlet(["pack", "inspect", pack], home: elsewhere).stdout.contains("disk-"))

        let run = swiftlet(["run", "--image", pack, "--", "sh", "-c",
                            "cat /root/file; sha256sum /dev/shm/blob; a=$(tail -n1 /root/log); sleep 1; b=$(tail -n1 /root/log); test $b -gt $a && echo counting"],
                           home: elsewhere)
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout == "on-disk\n" + blob + "counting\n", "\(run.stdout)")
        leftNothing(in: elsewhere)

        // A machine of its own elsewhere: its first start goes on where the packed one was, a
        // later start boots from its disk.
        func copy(_ arguments: [String]) -> Subprocess { swiftlet(["machine"] + arguments, home: elsewhere) }
        let created = copy(["create", "--name", "copy", "--from", pack])
        #expect(created.status == 0 && created.stderr.contains("created machine copy"), "\(created.stderr)")
        let started = copy(["start", "copy"])
        #expect(started.status == 0, "\(started.stderr)")
        let resumed = copy(["exec", "copy", "--", "sh", "-c",
                            "hostname; cat /root/file; sha256sum /dev/shm/blob; a=$(tail -n1 /root/log); sleep 1; b=$(tail -n1 /root/log); test $b -gt $a && echo counting"])
        #expect(resumed.status == 0 && resumed.stdout == "copy\non-disk\n" + blob + "counting\n", "\(resumed.stdout)\(resumed.stderr)")
        #expect(copy(["stop", "copy"]).status == 0)
        #expect(copy(["start", "copy"]).status == 0)
        let booted = copy(["exec", "copy", "--", "sh", "-c", "cat /root/file; test -e /dev/shm/blob || echo booted"])
        #expect(booted.stdout == "on-disk\nbooted\n", "\(booted.stdout)\(booted.stderr)")
        #expect(copy(["rm", "--force", "copy"]).status == 0)
        #expect(access(elsewhere + "/machines/copy", F_OK) != 0)
        leftNothing(in: elsewhere)
        // A pack's maker's network policy is never taken; one this machine cannot have is refused.
        let networked = copy(["create", "--name", "networked", "--from", pack, "--net"])
        #expect(networked.status == 1 && networked.stderr.contains("has no network device"), "\(networked.stderr)")

        // The machine packed straight from the store: running, with its memory; then stopped,
        // its disk alone, which boots where it is made a machine.
        let live = dir.path + "/live.swiftlet", cold = dir.path + "/cold.swiftlet"
        let packedLive = swiftlet(["pack", "create", "--machine", "src", "--with-memory", "-o", live], home: home)
        #expect(packedLive.status == 0, "\(packedLive.stderr)")
        let fromLive = swiftlet(["run", "--image", live, "--", "sh", "-c", "cat /root/file; sha256sum /dev/shm/blob"], home: elsewhere)
        #expect(fromLive.stdout == "on-disk\n" + blob, "\(fromLive.stdout)\(fromLive.stderr)")
        let running = swiftlet(["pack", "create", "--machine", "src", "-o", cold], home: home)
        #expect(running.status == 1 && running.stderr.contains("is running"), "\(running.stderr)")
        #expect(machine(["stop", "src"]).status == 0)
        let packedCold = swiftlet(["pack", "create", "--machine", "src", "-o", cold], home: home)
        #expect(packedCold.status == 0, "\(packedCold.stderr)")
        let notRunnable = swiftlet(["run", "--image", cold, "--", "true"], home: elsewhere)
        #expect(notRunnable.status == 1 && notRunnable.stderr.contains("make a machine of it"), "\(notRunnable.stderr)")
        #expect(copy(["create", "--name", "booted", "--from", cold]).status == 0)
        let bootedStart = copy(["start", "booted"])
        #expect(bootedStart.status == 0, "\(bootedStart.stderr)")
        let fresh = copy(["exec", "booted", "--", "sh", "-c", "hostname; cat /root/file; test -e /dev/shm/blob || echo booted"])
        #expect(fresh.stdout == "booted\non-disk\nbooted\n", "\(fresh.stdout)\(fresh.stderr)")
        #expect(copy(["rm", "--force", "booted"]).status == 0)
        leftNothing(in: elsewhere)
        // Not a machine's pack, or a damaged one: refused, and no machine is left.
        let image = dir.path + "/busybox-for-machine.snap", imagePack = dir.path + "/busybox-for-machine.swiftlet"
        #expect(swiftlet(["snapshot", "--memory", "128", "-o", image], home: home).status == 0)
        #expect(swiftlet(["pack", "create", "--from", image, "-o", imagePack], home: home).status == 0)
        let notMachine = copy(["create", "--name", "nope", "--from", imagePack])
        #expect(notMachine.status == 1 && notMachine.stderr.contains("is not of a machine"), "\(notMachine.stderr)")
        #expect(access(elsewhere + "/machines/nope", F_OK) != 0)
    }

    @Test func aDamagedOrCutPackIsRefusedNamingThePartAndLeavesNothing() throws {
        let snapshot = dir.path + "/busybox.snap", pack = dir.path + "/busybox.swiftlet"
        try #require(swiftlet(["snapshot", "--memory", "128", "-o", snapshot], home: home).status == 0)
        try #require(swiftlet(["pack", "create", "--from", snapshot, "-o", pack], home: home).status == 0)
        // Arguments, input and exit status, as `run` has them.
        let arguments = swiftlet(["run", "--image", pack, "-i", "--", "sh", "-c", "read line; echo $line $0 $1; exit 3", "a", "b"],
                                 home: elsewhere, stdin: "input\n")
        #expect(arguments.status == 3 && arguments.stdout == "input a b\n", "\(arguments.stdout)\(arguments.stderr)")
        // The same as a program of its own: another name, another directory, an empty
        // environment (no HOME, no SWIFTLET_HOME, no PATH), started from elsewhere.
        let program = dir.path + "/busybox-app"
        let made = swiftlet(["pack", "create", "--from", snapshot, "-o", program, "--executable"], home: home)
        try #require(made.status == 0, "\(made.stderr)")
        #expect(access(program, X_OK) == 0)
        try makeDirectories(dir.path + "/bin")
        let moved = dir.path + "/bin/renamed"
        #expect(rename(program, moved) == 0)
        let ran = Subprocess.run(["/bin/sh", "-c", "cd / && exec env -i \"$0\" -i -- sh -c 'read line; echo $line $0 $1; exit 4' x y", moved],
                                 stdin: "in\n", timeout: 600)
        #expect(ran.status == 4 && ran.stdout == "in x y\n", "\(ran.stdout)\(ran.stderr)")
        let help = Subprocess.run([moved, "--help"], timeout: 60)
        #expect(help.status == 0 && help.stdout.contains("renamed: a machine packed into one program"), "\(help.stdout)")
        for scratch in ["/var/tmp", "/tmp"] {
            #expect(!(OwnedFileDescriptor.directoryEntries(scratch) ?? []).contains { $0.name.hasPrefix("swiftlet-pack") }, "\(scratch): nothing left unpacked")
        }
        let good = try OwnedFileDescriptor.readSmallFile(pack, limit: 512 << 20)
        // A byte inside a stored chunk of the memory.
        let json = swiftlet(["pack", "inspect", "--json", pack], home: elsewhere).stdout
        struct Chunk: Decodable { var encoding: String; var offset: UInt64; var length: UInt64 }
        struct Part: Decodable { var name: String; var chunks: [Chunk] }
        struct Manifest: Decodable { var parts: [Part] }
        let manifest = try JSONDecoder().decode(Manifest.self, from: Data(json.utf8))
        let chunk = try #require(manifest.parts.first { $0.name == "memory" }?.chunks.first { $0.encoding != "zero" })
        var damaged = good
        damaged[Int(chunk.offset + chunk.length / 2)] ^= 0x01
        let bad = dir.write("damaged.swiftlet", damaged)
        let refused = swiftlet(["run", "--image", bad, "--", "echo", "ran"], home: elsewhere)
        #expect(refused.status == 1 && !refused.stdout.contains("ran") && refused.stderr.contains("part memory") && refused.stderr.contains("damaged"),
                "\(refused.stderr)")
        let verify = swiftlet(["pack", "verify", bad], home: elsewhere)
        #expect(verify.status == 1 && verify.stderr.contains("part memory"), "\(verify.stderr)")
        let cut = dir.write("cut.swiftlet", Array(good.prefix(good.count / 2)))
        let short = swiftlet(["pack", "inspect", cut], home: elsewhere)
        #expect(short.status == 1 && short.stderr.contains("not a Swiftlet pack"), "\(short.stderr)")
        leftNothing(in: elsewhere)
    }
}
