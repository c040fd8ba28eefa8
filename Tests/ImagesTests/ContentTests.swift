import Glibc
import Images
import SwiftletSystem
import Testing
import TestSupport

@Suite struct ContentTests {
    let dir = TemporaryDirectory()

    func sh(_ line: String) -> Subprocess { Subprocess.run(["/bin/sh", "-c", line], environment: ["D": dir.path]) }

    func hash(_ bytes: [UInt8], portable: Bool) -> String {
        var hasher = SHA256(portable: portable)
        hasher.update(bytes)
        return Digest(bytes: hasher.finalize()).hex
    }

    /// Both the portable rounds and (where the CPU has them) the SHA extensions.
    @Test(arguments: [true, false])
    func sha256MatchesTheStandardVectors(portable: Bool) {
        #expect(hash([], portable: portable) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hash(Array("abc".utf8), portable: portable) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8), portable: portable)
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(hash([UInt8](repeating: 0x61, count: 1_000_000), portable: portable)
                == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test func theSHAExtensionsAreUsedWhereTheCPUHasThem() {
        let cpuHasThem = sh("grep -qw sha_ni /proc/cpuinfo").status == 0
        #expect(SHA256().usesHardware == cpuHasThem)
        #expect(!SHA256(portable: true).usesHardware)
    }

    @Test(arguments: [true, false])
    func sha256AgreesWithSha256sumWhateverTheChunking(portable: Bool) throws {
        let path = dir.path + "/random"
        #expect(sh(#"head -c 3000017 /dev/urandom > "$D/random""#).status == 0)
        let expected = String(sh(#"sha256sum "$D/random""#).stdout.prefix(64))
        let bytes = try OwnedFileDescriptor.readSmallFile(path, limit: 4 << 20)
        #expect(hash(bytes, portable: portable) == expected)
        var hasher = SHA256(portable: portable)
        var offset = 0, step = 1
        while offset < bytes.count {
            let end = min(bytes.count, offset + step)
            bytes[offset..<end].withUnsafeBytes { hasher.update($0) }
            offset = end
            step = step * 3 % 70_001 + 1 // odd sizes across block boundaries
        }
        #expect(Digest(bytes: hasher.finalize()).hex == expected)
    }

    @Test func imagesWithMoreLayersThanDisksShareTheLastDisk() {
        #expect(ImageStore.diskGroups(layerCount: 3) == [0..<1, 1..<2, 2..<3])
        let many = ImageStore.diskGroups(layerCount: 20, maximum: 16)
        #expect(many.count == 16 && many.last == 15..<20 && many.dropLast().allSatisfy { $0.count == 1 })
        let a = Digest.of([1]), b = Digest.of([2])
        #expect(ImageStore.diskKey([a][...]) == a, "one layer's disk is keyed by its diff ID")
        #expect(ImageStore.diskKey([a, b][...]) == Digest.of(Array("\(a) \(b)".utf8)), "several: the OCI chain ID")
    }

    @Test func digestsAreParsedStrictly() throws {
        let good = "sha256:" + String(repeating: "ab", count: 32)
        #expect(try Digest(parsing: good).description == good)
        #expect(throws: SwiftletError.self) { try Digest(parsing: "sha256:" + String(repeating: "AB", count: 32)) }
        #expect(throws: SwiftletError.self) { try Digest(parsing: "sha256:abc") }
        #expect { try Digest(parsing: "sha512:" + String(repeating: "a", count: 128)) } throws: {
            ($0 as! SwiftletError).message.contains("sha256 digests only")
        }
    }

    @Test(arguments: [
        ("busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
        ("alpine:3.20", "docker.io/library/alpine:3.20", "registry-1.docker.io"),
        ("user/app:v1.2-rc", "docker.io/user/app:v1.2-rc", "registry-1.docker.io"),
        ("ghcr.io/owner/tool", "ghcr.io/owner/tool:latest", "ghcr.io"),
        ("localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t", "localhost:5000"),
        ("127.0.0.1:5000/x@sha256:" + String(repeating: "0", count: 64),
         "127.0.0.1:5000/x@sha256:" + String(repeating: "0", count: 64), "127.0.0.1:5000"),
    ])
    func referencesGetDockersDefaults(text: String, expected: String, host: String) throws {
        let reference = try ImageReference(parsing: text)
        #expect(reference.description == expected)
        #expect(reference.apiHost == host)
    }

    @Test func badReferencesAreRejected() {
        for text in ["", "Ubuntu", "a//b", "busybox:", "busybox:-x", "busybox@sha256:12", "ex ample"] {
            #expect(throws: SwiftletError.self, "\(text)") { try ImageReference(parsing: text) }
        }
        #expect((try? ImageReference(parsing: "localhost:5000/x"))?.isLoopback == true)
        #expect((try? ImageReference(parsing: "example.com/x"))?.isLoopback == false)
    }

    /// Reads a layer whole through LayerStream.
    func unpack(_ path: String) throws(SwiftletError) -> ([UInt8], Digest) {
        let stream = try LayerStream(path: path)
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1000) // small: many calls, partial frames
        while true {
            let n = try buffer.withMutableBytes { raw throws(SwiftletError) in try stream.read(into: raw) }
            if n == 0 { break }
            out += buffer[0..<n]
        }
        return (out, stream.uncompressedDigest())
    }

    @Test func layersDecompressFromGzipZstdOrNothing() throws {
        #expect(sh(#"head -c 200000 /dev/urandom > "$D/plain" && gzip -k "$D/plain" && zstd -q "$D/plain" -o "$D/plain.zst" && "#
                   + #"{ head -c 1000 "$D/plain" | gzip; tail -c +1001 "$D/plain" | gzip; } > "$D/members.gz""#).status == 0)
        let plain = try OwnedFileDescriptor.readSmallFile(dir.path + "/plain")
        for (name, compression) in [("plain", LayerCompression.none), ("plain.gz", .gzip), ("plain.zst", .zstd), ("members.gz", .gzip)] {
            #expect(try LayerStream(path: dir.path + "/" + name).compression == compression)
            let (bytes, digest) = try unpack(dir.path + "/" + name)
            #expect(bytes == plain, "\(name)")
            #expect(digest == Digest.of(plain), "\(name)")
        }
    }

    @Test func truncatedAndCorruptLayersAreErrors() throws {
        #expect(sh(#"head -c 300000 /dev/urandom > "$D/p" && gzip -k "$D/p" && zstd -q "$D/p" -o "$D/p.zst" && "#
                   + #"head -c 150000 "$D/p.gz" > "$D/short.gz" && head -c 150000 "$D/p.zst" > "$D/short.zst" && "#
                   + #"cp "$D/p.gz" "$D/bad.gz" && printf 'XXXXXXXX' | dd of="$D/bad.gz" bs=1 seek=5000 conv=notrunc 2>/dev/null && "#
                   + #"cp "$D/p.zst" "$D/bad.zst" && printf 'XXXXXXXX' | dd of="$D/bad.zst" bs=1 seek=5000 conv=notrunc 2>/dev/null"#).status == 0)
        for name in ["short.gz", "short.zst"] {
            #expect { try unpack(dir.path + "/" + name) } throws: { ($0 as! SwiftletError).message.contains("truncated") }
        }
        for name in ["bad.gz", "bad.zst"] {
            #expect { try unpack(dir.path + "/" + name) } throws: { ($0 as! SwiftletError).message.contains("corrupt") }
        }
    }
}
