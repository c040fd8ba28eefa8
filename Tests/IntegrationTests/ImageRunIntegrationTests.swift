import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// `swiftlet run --image`: OCI images (layout, archive, stdin) as layered root filesystems, with
/// the image config applied under the command line's options.
@Suite(.serialized, .enabled(if: TestHost.integration && TestImages.directory != nil,
                             "Linux-guest integration tests run in the nested test host (make test-nested), with the test images"))
struct ImageRunIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func run(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "run"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 300)
    }

    @Test func theImageConfigRunsWhenNoCommandIsGiven() {
        let r = run(["--image", TestImages.path("layout")])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "cwd=/srv from_image=yes\nhello from the image\n")
    }

    @Test func layersStackWithWhiteoutsAndOptionsOverrideTheConfig() {
        // The entrypoint is `sh -c`: the command after -- is its script.
        let script = "cat /etc/motd; test -e /etc/gone || echo gone-is-gone; ls /opaque; echo $FROM_IMAGE; pwd; id -u"
        let r = run(["--image", TestImages.path("zstd"), "-e", "FROM_IMAGE=overridden", "-w", "/tmp", "-u", "app", "--", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "layer two\ngone-is-gone\nnew\noverridden\n/tmp\n1000\n")
    }

    /// 18 layers on 14 disks: the top five merged into one, whose whiteouts hide files on the
    /// separate disks below and in the merged layers themselves.
    @Test func moreLayersThanDisks() {
        let r = run(["--image", TestImages.path("many"), "--", "sh", "-c", "ls /layers | wc -l; test -e /layers/1 || echo 1-gone; test -e /layers/17 || echo 17-gone; cat /layers/18"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").map { $0.trimmingWhitespace } == ["16", "1-gone", "17-gone", "18"], "\(r.stdout)")
    }

    @Test func archivesFromFilesAndStandardInput() {
        let saved = run(["--image", TestImages.path("docker-save.tar"), "--", "echo from-docker-save; exit 4"])
        #expect(saved.status == 4, "\(saved.stderr)")
        #expect(saved.stdout == "from-docker-save\n")
        // Once imported, the image runs by name, without the archive.
        let byName = run(["--image", "test/busybox", "--pull", "never", "--", "cat /etc/motd"])
        #expect(byName.stdout == "layer two\n", "\(byName.stderr)")
        let piped = Subprocess.run(["/bin/sh", "-c", "\"$0\" run --image - -- 'echo from-stdin' < \"$1\"", swiftlet, TestImages.path("oci-archive.tar")],
                                   environment: ["SWIFTLET_HOME": home.path], timeout: 300)
        #expect(piped.status == 0 && piped.stdout == "from-stdin\n", "\(piped.stderr)")
    }

    @Test func badImagesAreClearErrors() {
        let wrongArch = run(["--image", TestImages.path("arm64")])
        #expect(wrongArch.status == 1 && wrongArch.stderr.contains("no linux/amd64 image"), "\(wrongArch.stderr)")
        let missing = run(["--image", "not-pulled-here", "--pull", "never"])
        #expect(missing.status == 1 && missing.stderr.contains("--pull never"), "\(missing.stderr)")
        let noCommand = run(["--image", TestImages.path("layout"), "--", "exec no-such-command"])
        #expect(noCommand.status == 127, "\(noCommand.stderr)")
    }

    /// A real distribution: Debian 12 (debootstrap minbase, one 50 MB layer), pulled and converted
    /// in the test host, with setuid binaries, hard links and dpkg's database intact.
    @Test(.enabled(if: TestHost.environment("SWIFTLET_DEBIAN_IMAGE") != nil, "scripts/build-debian-image needs root"))
    func aDebianImageRuns() {
        let image = TestHost.environment("SWIFTLET_DEBIAN_IMAGE") ?? ""
        let script = "cat /etc/debian_version; stat -c %a /usr/bin/passwd; dpkg-query -W -f='${Package}\\n' coreutils; "
            + "[ $(stat -c %i /usr/bin/perl) = $(stat -c %i /usr/bin/perl5.36.0) ] && echo hardlinked; echo $0"
        let r = run(["--image", image, "--", "bash", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 5 && lines[0].hasPrefix("12."), "\(r.stdout)")
        #expect(Array(lines.dropFirst()) == ["4755", "coreutils", "hardlinked", "bash"], "\(r.stdout)")
    }

    @Test func detachedRunsLeaveOutputAndStatusBehind() throws {
        let r = run(["-d", "--image", TestImages.path("layout"), "--", "echo in-the-background; echo err >&2; exit 5"])
        #expect(r.status == 0, "\(r.stderr)")
        let id = r.stdout.trimmingWhitespace
        try #require(id.count == 12, "\(r.stdout)")
        let directory = home.path + "/runs/" + id
        var status: String?
        for _ in 0..<600 where status == nil {
            if let bytes = try? OwnedFileDescriptor.readSmallFile(directory + "/status") { status = String(decoding: bytes, as: UTF8.self) }
            else { usleep(200_000) }
        }
        #expect(status == "5\n")
        #expect((try? OwnedFileDescriptor.readSmallFile(directory + "/stdout")).map { String(decoding: $0, as: UTF8.self) } == "in-the-background\n")
        #expect((try? OwnedFileDescriptor.readSmallFile(directory + "/stderr")).map { String(decoding: $0, as: UTF8.self) } == "err\n")
        // The run's output is the user's alone.
        func mode(_ path: String) -> mode_t {
            var info = stat()
            return lstat(path, &info) == 0 ? info.st_mode & 0o7777 : 0
        }
        #expect(mode(home.path + "/runs") == 0o700 && mode(directory) == 0o700)
        #expect(mode(directory + "/stdout") == 0o600 && mode(directory + "/stderr") == 0o600 && mode(directory + "/status") == 0o600)
    }
}
