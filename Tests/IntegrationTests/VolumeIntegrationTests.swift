import FoundationEssentials
import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// Host directories in machines (`-v`, virtio-fs served inside the VMM), through the CLI with
/// real guests: reads, writes the host sees at once, renames and deletes, `:ro` refused with
/// EROFS, a build-like workload, symlinks that point out of the directory, and machines with
/// volumes through snapshots, forks and restarts.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct VolumeIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func swiftletRun(_ arguments: [String], timeout: Double = 300) -> Subprocess {
        Subprocess.run([swiftlet] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: timeout)
    }

    func write(_ path: String, _ text: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0)
        _ = text.utf8CString.dropLast().withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    func read(_ path: String) -> String? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return String(decoding: data, as: UTF8.self)
    }

    @Test func aRunReadsAndWritesAHostDirectoryAndCannotWriteAReadOnlyOne() throws {
        let shared = home.path + "/shared", readOnly = home.path + "/ro"
        mkdir(shared, 0o755); mkdir(shared + "/sub", 0o755); mkdir(readOnly, 0o755)
        try write(shared + "/hello.txt", "from the host\n")
        try write(readOnly + "/kept.txt", "keep me\n")
        try write(home.path + "/outside.txt", "not the guest's\n")
        symlink(home.path + "/outside.txt", shared + "/link-out")
        let script = """
            set -e
            cat /mnt/share/hello.txt
            echo from-the-guest > /mnt/share/sub/new.txt
            mkdir /mnt/share/made && mv /mnt/share/sub/new.txt /mnt/share/made/moved.txt
            rm /mnt/share/hello.txt
            ln -s made/moved.txt /mnt/share/rel-link && cat /mnt/share/rel-link
            stat -c 'owner %u:%g' /mnt/share/made/moved.txt
            if cat /mnt/share/link-out 2>/dev/null; then echo ESCAPED; fi
            if ls /mnt/share/../ | grep -q outside; then echo ESCAPED-DOTDOT; fi
            if (echo x > /data/new.txt) 2>&1; then echo WROTE-RO; fi
            if rm /data/kept.txt 2>&1; then echo REMOVED-RO; fi
            cat /data/kept.txt
            """
        let out = swiftletRun(["run", "-v", shared + ":/mnt/share", "-v", readOnly + ":/data:ro", "--", "sh", "-c", script])
        #expect(out.status == 0, "\(out.stdout)\n\(out.stderr)")
        #expect(out.stdout.contains("from the host"))
        #expect(out.stdout.contains("from-the-guest"), "a relative symlink made in the guest resolves there")
        #expect(out.stdout.contains("owner 0:0"), "the guest's files are root's in the guest")
        #expect(!out.stdout.contains("ESCAPED") && !out.stdout.contains("WROTE-RO") && !out.stdout.contains("REMOVED-RO"), "\(out.stdout)")
        #expect(out.stdout.split(separator: "\n").filter { $0.contains("Read-only file system") }.count == 2, "both writes to :ro fail with EROFS: \(out.stdout)")
        #expect(out.stdout.contains("keep me"))
        // The host sees it all at once.
        #expect(read(shared + "/made/moved.txt") == "from-the-guest\n")
        #expect(access(shared + "/hello.txt", F_OK) != 0 && access(shared + "/sub/new.txt", F_OK) != 0)
        var st = stat()
        #expect(stat(shared + "/made/moved.txt", &st) == 0 && st.st_uid == geteuid(), "files the guest makes are the host user's")
        #expect(read(readOnly + "/kept.txt") == "keep me\n" && access(readOnly + "/new.txt", F_OK) != 0)
        #expect(read(home.path + "/outside.txt") == "not the guest's\n")
    }

    @Test func aBuildLikeWorkloadIsCorrect() throws {
        let shared = home.path + "/src"
        mkdir(shared, 0o755)
        // 3,000 small files in 30 directories, one in ten with a marker, as a tar made here.
        var archive: [UInt8] = []
        var contents: [String: String] = [:]
        for d in 0..<30 {
            archive += Self.tarHeader("d\(d)/", size: 0, directory: true)
            for f in 0..<100 {
                let text = (f % 10 == 0 ? "needle \(d)-\(f)\n" : "hay \(d)-\(f)\n") + String(repeating: "x", count: f * 7)
                contents["d\(d)/f\(f).c"] = text
                archive += Self.tarHeader("d\(d)/f\(f).c", size: text.utf8.count, directory: false) + Array(text.utf8)
                archive += [UInt8](repeating: 0, count: (512 - text.utf8.count % 512) % 512)
            }
        }
        archive += [UInt8](repeating: 0, count: 1024)
        let fd = open(shared + "/src.tar", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0)
        _ = archive.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        let script = """
            set -e
            mkdir /w/out && tar -xf /w/src.tar -C /w/out
            echo files $(find /w/out -type f | wc -l)
            echo dirs $(find /w/out -type d | wc -l)
            echo needles $(grep -rl needle /w/out | wc -l)
            cat /w/out/d7/f30.c | head -1
            du -s /w/out > /dev/null
            rm -r /w/out/d29 && echo left $(ls /w/out | wc -l)
            """
        let out = swiftletRun(["run", "--memory", "512", "-v", shared + ":/w", "--", "sh", "-c", script], timeout: 600)
        #expect(out.status == 0, "\(out.stdout)\n\(out.stderr)")
        #expect(out.stdout.contains("files 3000"), "\(out.stdout)")
        #expect(out.stdout.contains("dirs 31"), "\(out.stdout)")
        #expect(out.stdout.contains("needles 300"), "\(out.stdout)")
        #expect(out.stdout.contains("needle 7-30"), "\(out.stdout)")
        #expect(out.stdout.contains("left 29"), "\(out.stdout)")
        // What the guest untarred is on the host, byte for byte.
        for (d, f) in [(0, 0), (13, 57), (28, 99)] {
            #expect(read(shared + "/out/d\(d)/f\(f).c") == contents["d\(d)/f\(f).c"], "d\(d)/f\(f).c")
        }
        #expect(access(shared + "/out/d29", F_OK) != 0)
    }

    /// A ustar header (POSIX tar) for a file or directory.
    static func tarHeader(_ name: String, size: Int, directory: Bool) -> [UInt8] {
        var header = [UInt8](repeating: 0, count: 512)
        func put(_ text: String, at offset: Int) { for (i, b) in text.utf8.enumerated() { header[offset + i] = b } }
        func octal(_ value: Int, width: Int) -> String {
            let digits = String(value, radix: 8)
            return String(repeating: "0", count: width - 1 - digits.count) + digits
        }
        put(name, at: 0)
        put(octal(directory ? 0o755 : 0o644, width: 8), at: 100)
        put(octal(0, width: 8), at: 108); put(octal(0, width: 8), at: 116)
        put(octal(size, width: 12), at: 124); put(octal(1_700_000_000, width: 12), at: 136)
        header[156] = directory ? 0x35 : 0x30
        put("ustar", at: 257); put("00", at: 263)
        put("        ", at: 148)
        let sum = header.reduce(0) { $0 + Int($1) }
        put(octal(sum, width: 7), at: 148)
        header[154] = 0
        return header
    }

    @Test func aMachineKeepsItsVolumesThroughSnapshotsForksAndRestarts() throws {
        let shared = home.path + "/work"
        mkdir(shared, 0o755)
        try write(shared + "/note", "one\n")
        #expect(swiftletRun(["run", "-v", shared + ":/proc/x", "--", "true"]).stderr.contains("/proc, /sys and /dev"))
        let bad = swiftletRun(["machine", "create", "--name", "bad", "-v", home.path + "/nowhere:/x"])
        #expect(bad.status != 0 && bad.stderr.contains("nowhere"), "\(bad.stderr)")
        #expect(access(home.path + "/machines/bad", F_OK) != 0, "a refused create leaves nothing")

        let created = swiftletRun(["machine", "create", "--name", "dev", "-v", shared + ":/work"])
        try #require(created.status == 0, "\(created.stderr)")
        defer { for name in ["dev", "copy", "back"] { _ = swiftletRun(["machine", "rm", "-f", name]) } }
        let started = swiftletRun(["machine", "start", "dev"])
        try #require(started.status == 0, "\(started.stderr)")
        let exec = swiftletRun(["machine", "exec", "dev", "--", "sh", "-c", "cat /work/note; echo two >> /work/note"])
        #expect(exec.status == 0 && exec.stdout == "one\n", "\(exec.stdout)\(exec.stderr)")
        #expect(read(shared + "/note") == "one\ntwo\n")
        let status = swiftletRun(["machine", "status", "dev"])
        #expect(status.stdout.contains("volumes: \(shared):/work"), "\(status.stdout)")
        // A process that holds a file in the volume open (and its directory as its own).
        let holder = "setsid sh -c 'cd /work; exec 3>>/work/log; while true; do hostname >&3; sleep 0.3; done' </dev/null >/dev/null 2>&1 &"
        #expect(swiftletRun(["machine", "exec", "dev", "--", "sh", "-c", holder]).status == 0)

        // A fork of the running machine: its copy has the volume, and the files its processes held.
        let fork = swiftletRun(["machine", "fork", "--from", "dev", "--name", "copy"])
        try #require(fork.status == 0, "\(fork.stderr)")
        let inCopy = swiftletRun(["machine", "exec", "copy", "--", "sh", "-c", "cat /work/note; echo from-copy > /work/copied"])
        #expect(inCopy.status == 0 && inCopy.stdout == "one\ntwo\n", "\(inCopy.stdout)\(inCopy.stderr)")
        #expect(read(shared + "/copied") == "from-copy\n")
        let copyStatus = swiftletRun(["machine", "status", "copy"])
        #expect(copyStatus.stdout.contains("volumes: \(shared):/work"), "\(copyStatus.stdout)")
        usleep(1_500_000)
        let lines = (read(shared + "/log") ?? "").split(separator: "\n")
        #expect(lines.contains("dev") && lines.contains("copy"), "the copy's process writes through the file it held open: \(lines.suffix(8))")

        // A snapshot: restored only with the volume given again, then it reads and writes it.
        let snapshot = swiftletRun(["machine", "snapshot", "dev", "-o", home.path + "/snap"])
        try #require(snapshot.status == 0, "\(snapshot.stderr)")
        let withoutVolume = swiftletRun(["machine", "restore", home.path + "/snap", "--name", "back"])
        #expect(withoutVolume.status != 0 && withoutVolume.stderr.contains("-v HOST_DIR:/work"), "\(withoutVolume.stderr)")
        let elsewhere = swiftletRun(["machine", "restore", home.path + "/snap", "--name", "back", "-v", shared + ":/other"])
        #expect(elsewhere.status != 0 && elsewhere.stderr.contains("/work"), "\(elsewhere.stderr)")
        let readOnly = swiftletRun(["machine", "restore", home.path + "/snap", "--name", "back", "-v", shared + ":/work:ro"])
        #expect(readOnly.status != 0 && readOnly.stderr.contains("writable"), "\(readOnly.stderr)")
        #expect(access(home.path + "/machines/back", F_OK) != 0, "a refused restore leaves nothing")
        // A pack of it cannot bring the volumes (nor name host directories of its own).
        let packed = swiftletRun(["pack", "create", "--from", home.path + "/snap", "-o", home.path + "/dev.swiftlet"])
        #expect(packed.status == 0, "\(packed.stderr)")
        let fromPack = swiftletRun(["machine", "create", "--name", "back", "--from", home.path + "/dev.swiftlet"])
        #expect(fromPack.status != 0 && fromPack.stderr.contains("shared host directories"), "\(fromPack.stderr)")
        let forkSnapshot = swiftletRun(["machine", "fork", "--from", home.path + "/snap", "--name", "back"])
        #expect(forkSnapshot.status != 0 && forkSnapshot.stderr.contains("machine restore -v"), "\(forkSnapshot.stderr)")
        let restored = swiftletRun(["machine", "restore", home.path + "/snap", "--name", "back", "-v", shared + ":/work"])
        try #require(restored.status == 0, "\(restored.stderr)")
        let inBack = swiftletRun(["machine", "exec", "back", "--", "sh", "-c", "cat /work/note /work/copied; echo from-back > /work/back"])
        #expect(inBack.status == 0 && inBack.stdout == "one\ntwo\nfrom-copy\n", "\(inBack.stdout)\(inBack.stderr)")
        #expect(read(shared + "/back") == "from-back\n")
        for name in ["copy", "back"] { #expect(swiftletRun(["machine", "rm", "-f", name]).status == 0) }
        // It still runs after all that.
        #expect(swiftletRun(["machine", "exec", "dev", "--", "cat", "/work/note"]).stdout == "one\ntwo\n")

        // Stopped, restarted: the volume again; with its directory gone, a clear refusal.
        #expect(swiftletRun(["machine", "stop", "dev"]).status == 0)
        #expect(swiftletRun(["machine", "start", "dev"]).status == 0)
        #expect(swiftletRun(["machine", "exec", "dev", "--", "cat", "/work/note"]).stdout == "one\ntwo\n")
        #expect(swiftletRun(["machine", "stop", "dev"]).status == 0)
        rename(shared, shared + ".gone")
        let again = swiftletRun(["machine", "start", "dev"])
        #expect(again.status != 0 && again.stderr.contains(shared), "\(again.stderr)")
        let restoreGone = swiftletRun(["machine", "restore", home.path + "/snap", "--name", "back", "-v", shared + ":/work"])
        #expect(restoreGone.status != 0 && restoreGone.stderr.contains(shared), "\(restoreGone.stderr)")
    }
}
