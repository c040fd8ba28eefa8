import Glibc
import SwiftletSystem
import Testing
import TestSupport
@testable import Images

/// Tar archives written byte by byte, for layers no `tar` program would make.
enum CraftedTar {
    /// A ustar header; `raw` overwrites byte ranges after the fields are set (the checksum is
    /// computed last, so a crafted field still passes it).
    static func header(_ name: String, type: Character = "0", size: UInt64 = 0, mode: UInt64 = 0o644,
                       raw: [(Int, [UInt8])] = []) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        func put(_ at: Int, _ bytes: [UInt8]) { h.replaceSubrange(at..<(at + bytes.count), with: bytes) }
        func octal(_ value: UInt64, _ width: Int) -> [UInt8] {
            let digits = String(value, radix: 8)
            return Array((String(repeating: "0", count: max(0, width - 1 - digits.count)) + digits).utf8) + [0]
        }
        put(0, Array(name.utf8.prefix(100)))
        put(100, octal(mode, 8)); put(108, octal(0, 8)); put(116, octal(0, 8))
        put(124, octal(size, 12)); put(136, octal(0, 12))
        h[156] = type.asciiValue!
        put(257, Array("ustar".utf8) + [0]); put(263, Array("00".utf8))
        for (at, bytes) in raw { put(at, bytes) }
        put(148, [UInt8](repeating: 32, count: 8))
        let sum = h.reduce(0) { $0 + UInt64($1) }
        let digits = String(sum, radix: 8)
        put(148, Array((String(repeating: "0", count: 6 - digits.count) + digits).utf8) + [0, 32])
        return h
    }

    static func padded(_ data: [UInt8]) -> [UInt8] { data + [UInt8](repeating: 0, count: (512 - data.count % 512) % 512) }

    /// A PAX extended header for the next entry, with `records` (or `body` as given).
    static func pax(_ records: [(String, String)] = [], body: [UInt8]? = nil) -> [UInt8] {
        let data = body ?? records.flatMap { key, value -> [UInt8] in
            let text = " \(key)=\(value)\n"
            var length = text.utf8.count + 1
            while String(length).utf8.count + text.utf8.count != length { length += 1 }
            return Array((String(length) + text).utf8)
        }
        return header("PaxHeader", type: "x", size: UInt64(data.count)) + padded(data)
    }

    static func file(_ name: String, _ data: [UInt8] = [], raw: [(Int, [UInt8])] = []) -> [UInt8] {
        header(name, size: UInt64(data.count), raw: raw) + padded(data)
    }

    static let end = [UInt8](repeating: 0, count: 1024)
}

/// Layers that are hostile: every crafted number, name and size is refused with a clear error
/// (several of these trapped the process before), and what is accepted passes `fsck.erofs`.
@Suite struct HostileLayerTests {
    let dir = TemporaryDirectory()

    final class Cursor: @unchecked Sendable {
        let bytes: [UInt8]
        var at = 0
        init(_ bytes: [UInt8]) { self.bytes = bytes }
    }

    /// Converts `tar` into an image; returns its path.
    @discardableResult
    func convert(_ tar: [UInt8], limits: ImportLimits = ImportLimits()) throws(SwiftletError) -> String {
        let image = dir.path + "/layer.erofs"
        let cursor = Cursor(tar)
        try LayerConverter.convert(scratchDirectory: dir.path, to: image, limits: limits) { buffer in
            let n = min(buffer.count, cursor.bytes.count - cursor.at)
            buffer.copyBytes(from: cursor.bytes[cursor.at..<(cursor.at + n)])
            cursor.at += n
            return n
        }
        return image
    }

    func refused(_ tar: [UInt8], limits: ImportLimits = ImportLimits(), saying text: String,
                 sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(sourceLocation: sourceLocation) { try convert(tar, limits: limits) } throws: { error in
            let message = (error as? SwiftletError)?.message ?? "\(error)"
            return message.contains(text) ? true : { Issue.record("message: \(message)", sourceLocation: sourceLocation); return false }()
        }
        #expect(access(dir.path + "/layer.erofs", F_OK) != 0, "no image after a refusal", sourceLocation: sourceLocation)
    }

    func readAll(_ path: String) -> [UInt8]? {
        guard let file = fopen(path, "rb") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = [], buffer = [UInt8](repeating: 0, count: 65536)
        while case let n = fread(&buffer, 1, buffer.count, file), n > 0 { bytes += buffer[..<n] }
        return bytes
    }

    func fsck(_ image: String) -> Subprocess { Subprocess.run(["/usr/bin/fsck.erofs", image]) }

    @Test func paxNumbersOutOfRangeAreRefused() {
        // A time as a double beyond Int64 (trapped before), and one that is not a number.
        refused(CraftedTar.pax([("mtime", "1e300")]) + CraftedTar.file("a") + CraftedTar.end, saying: "PAX mtime of '1e300'")
        refused(CraftedTar.pax([("mtime", "99999999999999999999")]) + CraftedTar.file("a") + CraftedTar.end, saying: "PAX mtime")
        refused(CraftedTar.pax([("mtime", "nan")]) + CraftedTar.file("a") + CraftedTar.end, saying: "PAX mtime of 'nan'")
        // size=2^70 was ignored before (and the header's size used); ids over 32 bits were ignored too.
        refused(CraftedTar.pax([("size", "1180591620717411303424")]) + CraftedTar.file("a") + CraftedTar.end,
                saying: "PAX size of '1180591620717411303424', not a number of at most 64 bits")
        refused(CraftedTar.pax([("size", "-1")]) + CraftedTar.file("a") + CraftedTar.end, saying: "PAX size of '-1'")
        refused(CraftedTar.pax([("uid", "4294967296")]) + CraftedTar.file("a") + CraftedTar.end, saying: "uid 4294967296, more than 32 bits")
        refused(CraftedTar.pax([("size", "18446744073709551615")]) + CraftedTar.file("a") + CraftedTar.end,
                saying: "more than a layer may hold")
    }

    @Test func paxRecordsWithBadLengthsAreRefused() {
        // A length near Int.max after a first record overflowed `at + length` (a trap) before.
        refused(CraftedTar.pax(body: Array("8 a=bcd\n9223372036854775807 path=x\n".utf8)) + CraftedTar.file("a") + CraftedTar.end,
                saying: "PAX header is malformed")
        for body in ["99999999999999999999999 path=x\n", "-5 path=x\n", "+12 path=ab\n", "3 path=x\n", "30 path=x\n", " 9 path=x\n"] {
            refused(CraftedTar.pax(body: Array(body.utf8)) + CraftedTar.file("a") + CraftedTar.end, saying: "PAX header is malformed")
        }
        // Many PAX headers before one entry add up past the limit.
        var limits = ImportLimits()
        limits.maxHeaderBytes = 4096
        let many = (0..<8).flatMap { i in CraftedTar.pax([("comment\(i)", String(repeating: "x", count: 1000))]) }
        refused(many + CraftedTar.file("a") + CraftedTar.end, limits: limits, saying: "more than 4096 bytes of PAX or long-name headers")
    }

    @Test func headerNumbersOutOfRangeAreRefused() {
        // base-256 sizes: more than 64 bits, and negative.
        let huge = [0x80] + [UInt8](repeating: 0xFF, count: 11)
        refused(CraftedTar.header("a", raw: [(124, huge)]) + CraftedTar.end, saying: "size at byte 0 does not fit in 64 bits")
        refused(CraftedTar.header("a", raw: [(124, [0xFF] + [UInt8](repeating: 0xFF, count: 11))]) + CraftedTar.end, saying: "size at byte 0 is negative")
        // A size within 64 bits but beyond any layer.
        refused(CraftedTar.header("a", raw: [(124, [0x80, 0, 0, 0, 0x7F] + [UInt8](repeating: 0xFF, count: 7))]) + CraftedTar.end,
                saying: "more than a layer may hold")
        refused(CraftedTar.header("a", raw: [(108, [0x80, 0, 0, 1, 0, 0, 0, 0])]) + CraftedTar.end, saying: "uid 4294967296, more than 32 bits")
        refused(CraftedTar.header("a", raw: [(136, [0x80] + [UInt8](repeating: 0xFF, count: 11))]) + CraftedTar.end, saying: "mtime at byte 0")
        refused(CraftedTar.header("dev", type: "3", raw: [(329, Array("0010000\0".utf8))]) + CraftedTar.end,
                saying: "device number 4096:0, out of Linux's range")
    }

    @Test func namesPathsAndTreesAreBounded() {
        // Names over 255 bytes were accepted before and written into directory blocks they overflow.
        for length in [256, 5000] {
            let name = String(repeating: "n", count: length)
            refused(CraftedTar.pax([("path", name)]) + CraftedTar.file("ignored") + CraftedTar.end,
                    saying: length > 4096 ? "longer than 4096 bytes" : "a name of 256 bytes")
        }
        let deep = Array(repeating: "d", count: 600).joined(separator: "/")
        refused(CraftedTar.pax([("path", deep)]) + CraftedTar.file("x") + CraftedTar.end, saying: "more than 512 directories deep")
        var limits = ImportLimits()
        limits.maxEntries = 10
        let many = (0..<20).flatMap { CraftedTar.file("f\($0)") }
        refused(many + CraftedTar.end, limits: limits, saying: "more than 10 entries")
        limits = ImportLimits()
        limits.maxMetadataBytes = 64 << 10
        let small = (0..<40).flatMap { CraftedTar.file("f\($0)", [UInt8](repeating: 1, count: 2000)) }
        refused(small + CraftedTar.end, limits: limits, saying: "metadata (names, small files, attributes) exceeds")
        refused(CraftedTar.pax([("path", "a\u{0}b")]) + CraftedTar.file("x") + CraftedTar.end, saying: "NUL byte")
    }

    @Test func whiteoutsOfNothingAreRefused() {
        for name in [".wh.", "dir/.wh..", "dir/.wh..."] {
            refused(CraftedTar.header("dir/", type: "5") + CraftedTar.file(name) + CraftedTar.end, saying: "which names nothing")
        }
        // An empty symlink target: fsck.erofs --extract (like Linux) cannot make it.
        refused(CraftedTar.header("empty-link", type: "2") + CraftedTar.end, saying: "has an empty target")
    }

    @Test func attributesThatCannotFitAreRefused() {
        let value = String(repeating: "v", count: 4100)
        refused(CraftedTar.pax([("SCHILY.xattr.user.big", value)]) + CraftedTar.file("a", [1]) + CraftedTar.end,
                saying: "bytes of extended attributes")
    }

    @Test(.enabled(if: access("/usr/bin/fsck.erofs", X_OK) == 0, "needs erofs-utils"))
    func acceptedOddLayersPassFsck() throws {
        // Small data and symlinks beside attributes too large to share the inode's block with them
        // (before, their data was pointed at block 0: the file read back the superblock), names of exactly 255 bytes, a deep tree,
        // pre-1970 and fractional times, a device at the top of Linux's range, whiteouts.
        let attributes = [("SCHILY.xattr.user.a", String(repeating: "a", count: 2500))]
        let long = String(repeating: "l", count: 255)
        let deep = Array(repeating: "d", count: 200).joined(separator: "/")
        var tar = CraftedTar.pax(attributes) + CraftedTar.file("small", Array(repeating: 7, count: 1800))
        tar += CraftedTar.pax(attributes) + CraftedTar.header("link", type: "2", raw: [(157, Array(String(repeating: "t", count: 99).utf8))])
        tar += CraftedTar.pax(attributes + [("linkpath", String(repeating: "s", count: 1900))]) + CraftedTar.header("link2", type: "2")
        tar += CraftedTar.pax([("path", long)]) + CraftedTar.file("x", [1, 2, 3])
        tar += CraftedTar.pax([("path", deep + "/" + long), ("mtime", "-100.5")]) + CraftedTar.file("y", [4])
        tar += CraftedTar.pax([("mtime", "1700000000.123456789")]) + CraftedTar.file("t")
        tar += CraftedTar.header("dev", type: "3", raw: [(329, Array("0007777\0".utf8)), (337, Array("3777777\0".utf8))])
        tar += CraftedTar.header("old", raw: [(136, [0xFF] + [UInt8](repeating: 0xFF, count: 11))])
        tar += CraftedTar.file(".wh.gone") + CraftedTar.header("o/", type: "5") + CraftedTar.file("o/.wh..wh..opq")
        // A directory of many long names spans several blocks; an attribute named by its prefix alone.
        for i in 0..<60 { tar += CraftedTar.pax([("path", "many/" + String(1000 + i) + String(repeating: "m", count: 251))]) + CraftedTar.file("m") }
        tar += CraftedTar.pax([("SCHILY.xattr.user.", "v")]) + CraftedTar.file("bare-attribute", [9])
        tar += CraftedTar.end
        let image = try convert(tar)
        let result = fsck(image)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let out = dir.path + "/out"
        let extracted = Subprocess.run(["/usr/bin/fsck.erofs", "--extract=" + out, image])
        #expect(extracted.status == 0, "\(extracted.stdout)\(extracted.stderr)")
        #expect(readAll(out + "/small") == Array(repeating: 7, count: 1800))
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(out + "/link2", &buffer, buffer.count)
        #expect(n == 1900)
        #expect(readAll(out + "/" + deep + "/" + long) == [4])
    }

    @Test func aDecompressionBombStopsAtTheLimit() throws {
        // 64 MiB of zeros gzip to about 64 KiB; a limit of 8 MiB stops the stream there.
        let path = dir.path + "/bomb.gz"
        let made = Subprocess.run(["/bin/sh", "-c", "head -c 67108864 /dev/zero | gzip -c > \"$0\"", path])
        try #require(made.status == 0, "\(made.stderr)")
        let stream = try LayerStream(path: path, limit: 8 << 20)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        #expect { while try buffer.withMutableBytes({ raw throws(SwiftletError) in try stream.read(into: raw) }) > 0 {} } throws: {
            ($0 as! SwiftletError).message.contains("unpacks to more than 8388608 bytes")
        }
        #expect(stream.produced <= 8 << 20)
        #expect(ImportLimits.parseSize("64G") == 64 << 30)
        #expect(ImportLimits.parseSize("99999999999T") == nil)
        #expect(ImportLimits.parseSize("x") == nil)
    }

    @Test func fileDataNeedsFreeSpace() {
        // A reserve larger than any disk: the first large file is refused before it is written.
        var limits = ImportLimits()
        limits.reserveBytes = UInt64.max - 1
        refused(CraftedTar.file("big", [UInt8](repeating: 1, count: 10000)) + CraftedTar.end, limits: limits, saying: "not enough free space")
    }
}

/// Manifests that declare sizes no blob can have: refused before any arithmetic on them (a layer
/// of Int64.max bytes trapped the progress line before).
@Suite struct HostileManifestTests {
    let home = TemporaryDirectory()

    /// An image held in memory: its manifest is the root, its blobs are put in the store as asked.
    struct MemorySource: ImageSource {
        let manifest: [UInt8]
        let blobs: [Digest: [UInt8]]
        var displayName: String { "a crafted image" }
        var imageName: String? { nil }
        func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?) { (manifest, MediaType.ociManifest) }
        func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError) {
            guard let bytes = blobs[descriptor.digest] else { throw SwiftletError(.notFound, "no \(what)") }
            try store.putBlob(bytes, expected: descriptor.digest, what: what)
        }
    }

    func source(layerSizes: [Int64]) -> MemorySource {
        let layer = Digest.of(Array("layer".utf8))
        let diffIDs = layerSizes.map { _ in "\"\(layer)\"" }.joined(separator: ",")
        let config = Array(#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[\#(diffIDs)]}}"#.utf8)
        let layers = layerSizes.map { #"{"mediaType":"\#(Array(MediaType.layers).sorted()[0])","digest":"\#(layer)","size":\#($0)}"# }
        let manifest = #"{"schemaVersion":2,"mediaType":"\#(MediaType.ociManifest)","config":{"mediaType":"\#(MediaType.ociConfig)","digest":"\#(Digest.of(config))","size":\#(config.count)},"layers":[\#(layers.joined(separator: ","))]}"#
        return MemorySource(manifest: Array(manifest.utf8), blobs: [Digest.of(config): config])
    }

    func refused(_ sizes: [Int64], saying text: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let store = try ImageStore(root: home.path + "/store")
        await #expect(sourceLocation: sourceLocation) { try await ImagePuller().pull(from: source(layerSizes: sizes), into: store) } throws: {
            let message = ($0 as! SwiftletError).message
            if !message.contains(text) { Issue.record("message: \(message)", sourceLocation: sourceLocation) }
            return message.contains(text)
        }
        #expect(try store.images().isEmpty, sourceLocation: sourceLocation)
    }

    @Test func impossibleSizesAreRefused() async throws {
        try await refused([Int64.max], saying: "add up to more than 2^63 bytes")
        try await refused([1 << 62, 1 << 62], saying: "add up to more than 2^63 bytes")
        try await refused([-5], saying: "declares a negative size (-5)")
        try await refused(Array(repeating: 1, count: 300), saying: "lists 300 layers")
        // A layer declared larger than any layer may unpack to is not downloaded.
        try await refused([1 << 40], saying: "is larger than a layer may be")
        #expect(ImagePuller.formatSize(Int64.max) == "8796093022207.9 MiB")
        #expect(ImagePuller.formatSize(3 << 19) == "1.5 MiB")
    }
}
