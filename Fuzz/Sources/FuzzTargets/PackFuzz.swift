import Glibc
import Pack
import SwiftletDigest
import SwiftletSystem

/// A pack (docs/pack-format.md). The input is a manifest and the data area before it: two bytes
/// of the manifest's length, the manifest, then the data. The target lays them out as a file and
/// adds the footer a maker would (with the manifest's right digest), so that inputs get past the
/// digest and reach the manifest's checks and the chunk reads. An accepted pack must verify or be
/// refused without a crash, and every part it extracts has exactly the size its manifest gives.
enum PackFuzz {
    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let manifestLength = Int(input.byte()) | Int(input.byte()) << 8
        let manifest = Array(bytes.dropFirst(2).prefix(manifestLength))
        let data = Array(bytes.dropFirst(2 + manifestLength))
        let footer = PackFooter(packLength: UInt64(data.count + manifest.count + PackFooter.size), manifestOffset: UInt64(data.count),
                                manifestLength: UInt64(manifest.count), manifestDigest: SHA256.hash(manifest))
        let path = Scratch.write(data + manifest + footer.bytes, to: "pack")
        guard let reader = try? PackReader(path: path) else { return }
        for part in reader.manifest.parts {
            precondition(part.chunks.count == Int((part.size + UInt64(part.chunkSize) - 1) / UInt64(part.chunkSize)), "a part's chunks do not cover it")
            let out = Scratch.directory + "/pack-part"
            unlink(out)
            guard let file = try? OwnedFileDescriptor.open(out, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600) else { continue }
            guard (try? reader.extract(part, to: file)) != nil else { continue }
            precondition((try? file.size()) == part.size, "an extracted part is not the size its manifest gives")
        }
        _ = try? reader.verify()
    }

    /// Real packs, in the target's input layout: parts of text, zeros and noise, one empty.
    static func seeds() throws -> [[UInt8]] {
        var seeds: [[UInt8]] = []
        for variant in 0..<2 {
            let path = Scratch.directory + "/seed-pack"
            unlink(path)
            let file = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
            let writer = try PackWriter(fd: file.rawValue)
            try writer.add(name: "state", bytes: Array("{\"a machine\": \(variant)}".utf8))
            try writer.add(name: "memory", bytes: [UInt8](repeating: 0, count: 1000) + Array(repeating: 7, count: 300 + variant))
            if variant == 1 { try writer.add(name: "disk-0", bytes: []) }
            let (manifest, length) = try writer.finish(kind: .snapshot, createdBy: "seeds")
            let encoded = try manifest.encoded()
            let whole = try file.read(count: Int(length), at: 0, what: "the seed pack")
            let dataEnd = Int(length) - PackFooter.size - encoded.count
            seeds.append([UInt8(encoded.count & 0xff), UInt8(encoded.count >> 8)] + encoded + Array(whole[0..<dataEnd]))
        }
        return seeds
    }
}
