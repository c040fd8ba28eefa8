import Glibc
import Hypervisor
import SwiftletDigest
import SwiftletSystem
import TestSupport
import Testing
@testable import Pack

/// Deterministic bytes that do not compress (xorshift).
func noise(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed | 1
    return (0..<count).map { _ in
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

/// A pack written by the tests' own hands: its file, and the contents of its parts.
struct TestPack {
    let path: String
    let contents: [String: [UInt8]]

    /// A pack (after `prefix`, as after an executable) with a sparse file (data, a hole, a
    /// zero-filled stretch, noise), a text part, an empty part and a part of 3 bytes.
    static func make(in directory: TemporaryDirectory, name: String = "test.swiftlet", prefix: [UInt8] = [],
                     sparseSize: Int = 3 << 20 + 12345) throws -> TestPack {
        let sparsePath = directory.path + "/sparse"
        let sparse = try OwnedFileDescriptor.open(sparsePath, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        try OwnedFileDescriptor.truncate(fd: sparse.rawValue, to: UInt64(sparseSize), what: "sparse")
        var expected = [UInt8](repeating: 0, count: sparseSize)
        let text = Array(Array(String(repeating: "a machine in one file; ", count: 2000).utf8).prefix(sparseSize / 2))
        try sparse.write(text, at: 0, what: "sparse")
        expected.replaceSubrange(0..<text.count, with: text)
        if sparseSize > 2 << 20 { try sparse.write([UInt8](repeating: 0, count: 4096), at: 1 << 20, what: "sparse") } // data, but zeros
        let random = noise(sparseSize > 2 << 20 ? sparseSize % (1 << 20) : sparseSize / 4, seed: 7) // the last chunk, all noise
        try sparse.write(random, at: UInt64(sparseSize - random.count), what: "sparse")
        expected.replaceSubrange(sparseSize - random.count..<sparseSize, with: random)

        let path = directory.path + "/" + name
        let output = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        try output.write(prefix, at: 0, what: "prefix")
        let writer = try PackWriter(fd: output.rawValue, start: UInt64(prefix.count))
        try writer.add(name: "disk-0", contentsOf: sparse, size: UInt64(sparseSize), what: "sparse")
        let state = Array("{\"state\": true}".utf8)
        try writer.add(name: "state", bytes: state)
        try writer.add(name: "empty", bytes: [])
        try writer.add(name: "tiny", bytes: [1, 2, 3])
        _ = try writer.finish(kind: .snapshot, createdBy: "PackTests")
        return TestPack(path: path, contents: ["disk-0": expected, "state": state, "empty": [], "tiny": [1, 2, 3]])
    }
}

func extracted(_ reader: PackReader, _ name: String, in directory: TemporaryDirectory) throws -> [UInt8] {
    let path = directory.path + "/out-" + name
    let output = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
    try reader.extract(try reader.part(name), to: output)
    return try OwnedFileDescriptor.readSmallFile(path, limit: 64 << 20)
}

func fileBytes(_ path: String) throws -> [UInt8] { try OwnedFileDescriptor.readSmallFile(path, limit: 64 << 20) }

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let file = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
    try file.write(bytes, at: 0, what: path)
}

/// The error opening and verifying the pack at `path` throws, or nil when it reads whole.
func refusal(_ path: String) -> SwiftletError? {
    do throws(SwiftletError) {
        _ = try PackReader(path: path).verify()
        return nil
    } catch {
        return error
    }
}

@Suite struct PackTests {
    let directory = TemporaryDirectory()

    @Test func partsComeBackAsTheyWentInWithHolesAndZerosNotStored() throws {
        let pack = try TestPack.make(in: directory)
        let reader = try PackReader(path: pack.path)
        #expect(reader.start == 0 && reader.manifest.kind == .snapshot && reader.manifest.createdBy == "PackTests")
        for (name, contents) in pack.contents {
            #expect(try extracted(reader, name, in: directory) == contents, "\(name)")
            // The part's digest: over its chunks' digests.
            let chunkSize = Int(try reader.part(name).chunkSize)
            let digests = stride(from: 0, to: contents.count, by: chunkSize).flatMap { SHA256.hash(contents[$0..<min($0 + chunkSize, contents.count)]) }
            #expect(try reader.part(name).sha256 == SHA256.hash(digests), "\(name)")
        }
        let disk = try reader.part("disk-0")
        // 4 chunks: text (compressed), a hole with 4 KiB of written zeros, a hole, and noise at the end (stored raw).
        #expect(disk.chunks.map(\.encoding) == [.zstd, .zero, .zero, .raw])
        #expect(disk.storedBytes < 20_000)
        #expect(disk.chunks.filter { $0.encoding != .zero }.allSatisfy { $0.offset % PackWriter.alignment == 0 })
        #expect(try reader.verify() == pack.contents.values.reduce(0) { $0 + UInt64($1.count) })
        // A hole stays a hole when extracted.
        let out = try OwnedFileDescriptor.open(directory.path + "/out-disk-0", flags: O_RDONLY)
        #expect(try out.dataRanges(size: disk.size).reduce(0) { $0 + $1.count } < 2 << 20)
    }

    @Test func aPackAfterAnExecutableIsFoundFromTheEnd() throws {
        let prefix = noise(70_001, seed: 3)
        let pack = try TestPack.make(in: directory, prefix: prefix)
        let reader = try PackReader(path: pack.path)
        #expect(reader.start == UInt64(prefix.count))
        #expect(try extracted(reader, "disk-0", in: directory) == pack.contents["disk-0"])
        #expect(Array(try fileBytes(pack.path).prefix(prefix.count)) == prefix)
    }

    @Test func everyFlippedByteThatMattersIsRefusedNamingWhatIsDamaged() throws {
        let pack = try TestPack.make(in: directory, sparseSize: 64 << 10)
        let original = try fileBytes(pack.path)
        let manifest = try PackReader(path: pack.path).manifest
        // Bytes a reader never looks at: the padding before aligned chunks.
        var used = Set<Int>()
        for part in manifest.parts {
            for chunk in part.chunks where chunk.encoding != .zero { used.formUnion(Int(chunk.offset)..<Int(chunk.offset + chunk.length)) }
        }
        let manifestStart = try #require(used.max()).advanced(by: 1)
        let damaged = directory.path + "/damaged"
        var refused = 0
        // Every byte of the manifest and the footer, every 7th of the chunks.
        for offset in 0..<original.count where offset >= manifestStart || (used.contains(offset) && offset % 7 == 0) {
            var bytes = original
            bytes[offset] ^= 0x20
            try writeFile(damaged, bytes)
            let error = try #require(refusal(damaged), "a flipped byte at \(offset) of \(original.count) went unnoticed")
            #expect(error.code == .invalidFormat, "\(offset): \(error)")
            #expect(error.message.contains("damaged") || error.message.contains("not a Swiftlet pack") || error.message.contains("newer"),
                    "\(offset): \(error.message)")
            refused += 1
        }
        #expect(refused > 1000)
        // A chunk's damage names its part.
        let chunk = try #require(manifest.part(named: "disk-0")?.chunks.first)
        var bytes = original
        bytes[Int(chunk.offset) + 1] ^= 1
        try writeFile(damaged, bytes)
        #expect(refusal(damaged)?.message.contains("part disk-0") == true)
    }

    @Test func aPackCutShortAnywhereIsRefused() throws {
        let pack = try TestPack.make(in: directory, sparseSize: 64 << 10)
        let original = try fileBytes(pack.path)
        let cut = directory.path + "/cut"
        for length in Array(stride(from: 0, to: original.count, by: 97)) + Array(original.count - 80..<original.count) {
            try writeFile(cut, Array(original.prefix(length)))
            let error = try #require(refusal(cut), "cut to \(length) bytes of \(original.count)")
            #expect(error.code == .invalidFormat, "\(length): \(error)")
        }
    }

    @Test func aNewerFormatAndAForeignFileAreNamedAsSuch() throws {
        let pack = try TestPack.make(in: directory, sparseSize: 8192)
        var bytes = try fileBytes(pack.path)
        let footer = bytes.count - PackFooter.size
        bytes[footer + 8] = 2
        try writeFile(pack.path, bytes)
        #expect(refusal(pack.path)?.message.contains("format version 2, made by a newer Swiftlet") == true)
        let foreign = directory.path + "/foreign"
        try writeFile(foreign, noise(10_000, seed: 9))
        #expect(refusal(foreign)?.message.contains("is not a Swiftlet pack") == true)
        try writeFile(foreign, [])
        #expect(refusal(foreign)?.message.contains("too short") == true)
    }

    /// A pack whose manifest says `manifest` over `data`, with a correct footer: what a hostile
    /// maker can write.
    func forged(_ manifest: PackManifest, data: [UInt8] = [UInt8](repeating: 0, count: 4096)) throws -> String {
        let bytes = try manifest.encoded()
        let footer = PackFooter(packLength: UInt64(data.count + bytes.count + PackFooter.size), manifestOffset: UInt64(data.count),
                                manifestLength: UInt64(bytes.count), manifestDigest: SHA256.hash(bytes))
        let path = directory.path + "/forged"
        try writeFile(path, data + bytes + footer.bytes)
        return path
    }

    @Test func aForgedManifestIsRefusedBeforeAnyPartIsRead() throws {
        let digest = [UInt8](repeating: 1, count: 32)
        func part(name: String = "memory", size: UInt64 = 4096, chunkSize: UInt32 = 4096, chunks: [PackChunk]? = nil) -> PackPart {
            PackPart(name: name, size: size, sha256: digest, chunkSize: chunkSize,
                     chunks: chunks ?? [PackChunk(encoding: .raw, offset: 0, length: 4096, sha256: digest)])
        }
        let cases: [(PackPart, String)] = [
            (part(name: "../state"), "named \"../state\""),
            (part(name: "a/b"), "named"),
            (part(name: ".hidden"), "named"),
            (part(size: 8192), "has 1 chunks"),
            (part(size: 1 << 50, chunks: []), "more than a pack holds"),
            (part(chunkSize: 3000), "chunks of 3000 bytes"),
            (part(chunks: [PackChunk(encoding: .raw, offset: 4000, length: 4096, sha256: digest)]), "outside the pack's data"),
            (part(chunks: [PackChunk(encoding: .raw, offset: UInt64.max - 10, length: 4096, sha256: digest)]), "outside the pack's data"),
            (part(chunks: [PackChunk(encoding: .raw, offset: 0, length: 100, sha256: digest)]), "stores 100 bytes of 4096"),
            (part(chunks: [PackChunk(encoding: .zstd, offset: 0, length: 1 << 30, sha256: digest)]), "compressed bytes"),
            (part(chunks: [PackChunk(encoding: .zero, offset: 8, length: 0, sha256: [])]), "has a place or digest"),
            (part(chunks: [PackChunk(encoding: .raw, offset: 0, length: 4096, sha256: [1])]), "has no SHA-256"),
        ]
        for (part, message) in cases {
            let path = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [part]))
            let error = try #require(refusal(path), "\(part)")
            #expect(error.message.contains("damaged pack manifest") && error.message.contains(message), "\(error.message)")
        }
        let vendor = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [part()],
                                             cpu: CPUContract(vendor: String(repeating: "x", count: 13), words: [])))
        #expect(refusal(vendor)?.message.contains("its CPU contract names a 13-byte vendor") == true)
        let words = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [part()],
                                            cpu: CPUContract(vendor: "", words: Array(repeating: .init(function: 1, register: .ecx, bits: 1), count: 1000))))
        #expect(refusal(words)?.message.contains("1000 feature registers") == true)
        let twice = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [part(), part()]))
        #expect(refusal(twice)?.message.contains("two parts are named memory") == true)
        // A chunk whose bytes do not match its digest.
        let mismatch = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [part()]))
        #expect(refusal(mismatch)?.message.contains("chunk 0 of part memory") == true)
        // A zstd chunk that holds more than its chunk.
        let compression = try PackCompression()
        let big = [UInt8](repeating: 5, count: 8192)
        var frame = [UInt8](repeating: 0, count: PackCompression.largestCompressedSize(of: big.count))
        let length = try big.withUnsafeBytes { source in try frame.withUnsafeMutableBytes { try compression.compress(source, into: $0) } }
        let bomb = try forged(PackManifest(kind: .snapshot, createdBy: "forger", parts: [
            part(chunks: [PackChunk(encoding: .zstd, offset: 0, length: UInt64(length), sha256: digest)])]),
            data: Array(frame.prefix(length)) + [UInt8](repeating: 0, count: 4096 - length))
        #expect(refusal(bomb)?.message.contains("chunk 0 of part memory of") == true)
    }

    @Test func theWriterRefusesNamesThatAreNotPlainAndTwice() throws {
        let file = try OwnedFileDescriptor.open(directory.path + "/w", flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        let writer = try PackWriter(fd: file.rawValue)
        try writer.add(name: "state", bytes: [1])
        #expect(throws: SwiftletError.self) { try writer.add(name: "state", bytes: [1]) }
        #expect(throws: SwiftletError.self) { try writer.add(name: "../x", bytes: [1]) }
        #expect(throws: SwiftletError.self) { try writer.add(name: "", bytes: [1]) }
    }
}
