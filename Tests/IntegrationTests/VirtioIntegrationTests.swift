import Glibc
import Synchronization
import SwiftletSystem
import Testing
import TestSupport

/// virtio devices through a real guest kernel: an ext4 image mounted read-only, a raw scratch disk
/// written by the guest and read back on the host, many disks at once, the entropy device.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct VirtioIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let dir = TemporaryDirectory()

    func boot(_ arguments: [String]) -> Subprocess {
        var r = Subprocess.run([swiftlet, "boot"] + arguments, timeout: 180)
        r.stdout = r.stdout.replacingCRLF
        return r
    }

    func bytes(_ path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            result += buffer[0..<n]
        }
        return result
    }

    /// An ext4 image holding hello.txt, made without root by mke2fs -d.
    func ext4Image() throws -> String {
        let root = dir.path + "/root"
        mkdir(root, 0o755)
        dir.write("root/hello.txt", Array("hello from a virtio disk\n".utf8))
        let image = dir.path + "/data.ext4"
        let r = Subprocess.run(["/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-d", root, image, "8M"])
        try #require(r.status == 0, "mke2fs: \(r.stderr)")
        return image
    }

    @Test func guestMountsReadsAndWritesDisks() throws {
        let data = try ext4Image()
        let before = bytes(data)
        var pattern = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<16 { pattern[5 * 512 + i] = UInt8(0xA0 + i) }
        let scratch = dir.write("scratch.img", pattern)
        // One line, no double quotes: the command travels on the kernel command line.
        let script = [
            "mkdir -p /mnt", "mount -o ro /dev/vda /mnt && cat /mnt/hello.txt",
            "echo ro=$(cat /sys/block/vda/ro) rw=$(cat /sys/block/vdb/ro) sectors=$(cat /sys/block/vdb/size) serial=$(cat /sys/block/vdb/serial)",
            "echo sector5=$(dd if=/dev/vdb bs=512 skip=5 count=1 2>/dev/null | od -A n -t x1 -N 4 | tr -d ' ')",
            "echo swiftlet-wrote-this | dd of=/dev/vdb bs=512 seek=1 conv=sync,fsync 2>/dev/null && echo write-ok",
            "dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null || echo ro-write-refused",
        ].joined(separator: "; ")
        let r = boot(["--disk", data + ",ro", "--disk", scratch, "--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("hello from a virtio disk"), "\(r.stdout)")
        #expect(r.stdout.contains("ro=1 rw=0 sectors=2048 serial=swiftlet-disk1"), "\(r.stdout)")
        #expect(r.stdout.contains("sector5=a0a1a2a3"), "\(r.stdout)")
        #expect(r.stdout.contains("write-ok"), "\(r.stdout)")
        #expect(r.stdout.contains("ro-write-refused"), "\(r.stdout)")
        let after = bytes(scratch)
        #expect(Array(after[512..<(512 + 20)]) == Array("swiftlet-wrote-this\n".utf8))
        #expect(Array(after[(5 * 512)..<(5 * 512 + 16)]) == Array(pattern[(5 * 512)..<(5 * 512 + 16)]))
        #expect(bytes(data) == before, "a read-only disk must come back unchanged")
    }

    @Test func manyDisksAndCPUs() throws {
        var arguments = ["--cpus", "4"]
        for i in 0..<8 {
            arguments += ["--disk", dir.write("d\(i).img", [UInt8](repeating: UInt8(i + 1), count: 4096)) + ",ro"]
        }
        let script = "for d in a b c d e f g h; do printf $d=; dd if=/dev/vd$d bs=512 count=1 2>/dev/null | od -A n -t u1 -N 1 | tr -d ' '; done"
        let r = boot(arguments + ["--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        for (i, name) in ["a", "b", "c", "d", "e", "f", "g", "h"].enumerated() {
            #expect(r.stdout.contains("\(name)=\(i + 1)\n"), "\(r.stdout)")
        }
    }

    @Test func entropyDeviceFeedsTheGuest() {
        let script = "cat /sys/class/misc/hw_random/rng_current; dd if=/dev/hwrng bs=32 count=2 2>/dev/null | od -A n -t x1 | tr -d ' ' | head -2"
        let r = boot(["--rng", "--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("virtio_rng.0"), "\(r.stdout)")
        let lines = r.stdout.split(separator: "\n").map { $0.trimmingWhitespace }.filter { $0.count == 32 && $0.allSatisfy(\.isHexDigit) }
        #expect(lines.count == 2 && lines[0] != lines[1], "\(r.stdout)")
    }

    @Test func guestConnectsToTheHostOverVsock() throws {
        let path = dir.path + "/agent.sock"
        let received = Mutex<[UInt8]>([])
        let listener = try #require(UnixSocketListener(path: path))
        let server = try OSThread.start(name: "listener") {
            guard let c = listener.accept(timeoutMilliseconds: 180_000) else { return }
            defer { close(c) }
            var buffer = [UInt8](repeating: 0, count: 4096)
            var got: [UInt8] = []
            while true {
                let n = buffer.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                got += buffer[0..<n]
            }
            received.withLock { $0 += got }
            // Answer after the guest's end of input: every byte back, reversed, and a big block.
            let reply = Array(got.reversed()) + [UInt8](repeating: UInt8(ascii: "z"), count: 300_000) + [10]
            _ = reply.withUnsafeBytes { write(c, $0.baseAddress, $0.count) }
        }
        defer {
            listener.shutdown() // ends a pending accept if the guest never connected
            server.join()
        }
        let script = "echo ping-over-vsock | vsock-cat 1024 > /tmp/out; echo status=$?; wc -c < /tmp/out; head -c 16 /tmp/out; echo; echo refused | vsock-cat 1025; echo refused-status=$?"
        let r = boot(["--vsock-forward", "1024:" + path, "--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(received.withLock { $0 } == Array("ping-over-vsock\n".utf8))
        #expect(r.stdout.contains("status=0\n300017\n\nkcosv-revo-gnip"), "\(r.stdout)")
        #expect(r.stdout.contains("refused-status=1"), "\(r.stdout)")
    }
}
