import FoundationEssentials
import Hypervisor
import Synchronization
import SwiftletDigest
import SwiftletSystem

/// What a pack holds (docs/pack-format.md): its kind, its parts and where each part's chunks are,
/// and what its maker recorded. JSON, right before the footer, covered by the footer's digest.
public struct PackManifest: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// A machine snapshot: its state, memory and writable disks, and the read-only disks
        /// (image layers) it was taken with; it restores on the other side.
        case snapshot
        /// A stopped machine without its memory: its description (`machine`, JSON), its
        /// writable disk (`disk`) and read-only disks; it boots on the other side.
        case machine
        /// An image: its description (`image`, JSON: name, how commands run, layers by part
        /// name), its layers, and the kernel and agent initramfs it boots with (`kernel`,
        /// `agent`), so it boots the same everywhere.
        case image
    }

    /// The format version; the same as the footer's.
    public var format: UInt32
    public var kind: Kind
    /// The Swiftlet that wrote it, for people ("swiftlet 0.x"); never interpreted.
    public var createdBy: String
    public var parts: [PackPart]
    /// A pack with memory (a snapshot pack): the CPU the memory depends on (features, vendor,
    /// TSC frequency), so a host that cannot run it says so before unpacking anything. Only a
    /// first, early check: a restore checks the snapshot's own CPUID again.
    public var cpu: CPUContract?

    public init(kind: Kind, createdBy: String, parts: [PackPart], cpu: CPUContract? = nil) {
        self.format = PackFooter.currentVersion
        self.kind = kind
        self.createdBy = createdBy
        self.parts = parts
        self.cpu = cpu
    }

    public func part(named name: String) -> PackPart? { parts.first { $0.name == name } }

    /// The largest part a pack may hold (a guest's memory or disk): 16 TiB.
    public static let maximumPartSize: UInt64 = 16 << 40
    public static let maximumParts = 4096

    /// Checks everything a reader relies on before it reads a byte of a part: the version, part
    /// names (unique, plain: `[a-z0-9._-]`, at most 128 bytes, not starting with a dot), sizes,
    /// chunk sizes and counts, and that every stored chunk lies in the pack's data area, before
    /// the manifest (`dataEnd`, relative to the pack's start). `path` names the pack in errors.
    public func validate(dataEnd: UInt64, path: String) throws(SwiftletError) {
        func damaged(_ what: String) -> SwiftletError {
            SwiftletError(.invalidFormat, "\(path) has a damaged pack manifest: \(what)")
        }
        guard format == PackFooter.currentVersion else { throw damaged("format \(format), and its footer says \(PackFooter.currentVersion)") }
        guard parts.count <= Self.maximumParts else { throw damaged("\(parts.count) parts, more than \(Self.maximumParts)") }
        if let cpu {
            guard cpu.vendor.utf8.count <= 12, cpu.words.count <= CPUContract.featureRegisters.count else {
                throw damaged("its CPU contract names a \(cpu.vendor.utf8.count)-byte vendor and \(cpu.words.count) feature registers")
            }
        }
        var names: Set<String> = []
        for part in parts {
            guard Self.isPlainName(part.name) else { throw damaged("a part is named \(part.name.debugDescription)") }
            guard names.insert(part.name).inserted else { throw damaged("two parts are named \(part.name)") }
            try part.validate(dataEnd: dataEnd, damaged: damaged)
        }
    }

    /// `[a-z0-9._-]`, 1 to 128 bytes, not starting with a dot: never a path.
    public static func isPlainName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...128).contains(bytes.count), bytes[0] != UInt8(ascii: ".") else { return false }
        return bytes.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }

    public func encoded() throws(SwiftletError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        do { return Array(try encoder.encode(self)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode a pack manifest: \(error)")
        }
    }

    public static func decode(_ bytes: [UInt8], path: String) throws(SwiftletError) -> PackManifest {
        do { return try JSONDecoder().decode(PackManifest.self, from: Data(bytes)) } catch {
            throw SwiftletError(.invalidFormat, "\(path) has a damaged pack manifest: it is not a manifest this Swiftlet reads (\(error))")
        }
    }
}

/// One part of a pack (a file's contents: a disk, the memory, the state), stored as chunks of
/// `chunkSize` bytes (the last one shorter), each compressed on its own or not at all, chunks of
/// zeros not stored: a reader can read any chunk alone and check it against its digest.
public struct PackPart: Codable, Sendable, Equatable {
    public var name: String
    /// The contents' size in bytes (a sparse disk's logical size).
    public var size: UInt64
    /// The part's digest: SHA-256 over its chunks' SHA-256s in order, a chunk of zeros counting
    /// as the SHA-256 of that many zero bytes (`zeroChunkDigest`). It identifies the contents
    /// (with `chunkSize`) without hashing a sparse disk's holes byte by byte.
    @HexBytes public var sha256: [UInt8]
    public var chunkSize: UInt32
    public var chunks: [PackChunk]

    public init(name: String, size: UInt64, sha256: [UInt8], chunkSize: UInt32, chunks: [PackChunk]) {
        self.name = name; self.size = size; self.sha256 = sha256; self.chunkSize = chunkSize; self.chunks = chunks
    }

    /// SHA-256 of `length` zero bytes, for the chunk sizes a part has (one full size, one last).
    static func zeroChunkDigest(length: Int) -> [UInt8] {
        zeroDigests.withLock { cache in
            if let digest = cache[length] { return digest }
            let digest = SHA256.hash([UInt8](repeating: 0, count: length))
            if cache.count < 64 { cache[length] = digest }
            return digest
        }
    }
    private static let zeroDigests = Mutex<[Int: [UInt8]]>([:])

    /// The number of chunks a part of `size` bytes has.
    static func chunkCount(size: UInt64, chunkSize: UInt32) -> UInt64 {
        size / UInt64(chunkSize) + (size % UInt64(chunkSize) == 0 ? 0 : 1)
    }

    /// The contents' length of chunk `index`.
    public func length(ofChunk index: Int) -> Int {
        let start = UInt64(index) * UInt64(chunkSize)
        return Int(min(UInt64(chunkSize), size - start))
    }

    /// The stored bytes of all chunks.
    public var storedBytes: UInt64 { chunks.reduce(0) { $0 + $1.length } }

    func validate(dataEnd: UInt64, damaged: (String) -> SwiftletError) throws(SwiftletError) {
        guard size <= PackManifest.maximumPartSize else { throw damaged("part \(name) has \(size) bytes, more than a pack holds") }
        guard chunkSize.nonzeroBitCount == 1, (4096...(64 << 20)).contains(chunkSize) else {
            throw damaged("part \(name) has chunks of \(chunkSize) bytes")
        }
        guard UInt64(chunks.count) == Self.chunkCount(size: size, chunkSize: chunkSize) else {
            throw damaged("part \(name) has \(chunks.count) chunks, and \(size) bytes in chunks of \(chunkSize) make \(Self.chunkCount(size: size, chunkSize: chunkSize))")
        }
        guard sha256.count == 32 else { throw damaged("part \(name) has no SHA-256") }
        let largestStored = UInt64(PackCompression.largestCompressedSize(of: Int(chunkSize)))
        for (index, chunk) in chunks.enumerated() {
            let length = UInt64(self.length(ofChunk: index))
            switch chunk.encoding {
            case .zero:
                guard chunk.offset == 0, chunk.length == 0, chunk.sha256.isEmpty else {
                    throw damaged("chunk \(index) of part \(name) is of zeros and has a place or digest")
                }
                continue
            case .raw:
                guard chunk.length == length else { throw damaged("chunk \(index) of part \(name) stores \(chunk.length) bytes of \(length)") }
            case .zstd:
                guard chunk.length > 0, chunk.length <= largestStored else {
                    throw damaged("chunk \(index) of part \(name) stores \(chunk.length) compressed bytes")
                }
            }
            guard chunk.sha256.count == 32 else { throw damaged("chunk \(index) of part \(name) has no SHA-256") }
            let (end, overflow) = chunk.offset.addingReportingOverflow(chunk.length)
            guard !overflow, end <= dataEnd else {
                throw damaged("chunk \(index) of part \(name) lies outside the pack's data (\(chunk.length) bytes at \(chunk.offset), data ends at \(dataEnd))")
            }
        }
    }
}

/// Where one chunk of a part is and how it is stored.
public struct PackChunk: Codable, Sendable, Equatable {
    public enum Encoding: String, Codable, Sendable {
        /// All zeros: nothing stored.
        case zero
        /// Stored as it is.
        case raw
        /// One zstd frame.
        case zstd
    }

    public var encoding: Encoding
    /// From the pack's first byte; 0 for a zero chunk.
    public var offset: UInt64
    /// Stored bytes; 0 for a zero chunk.
    public var length: UInt64
    /// SHA-256 of the chunk's contents; empty for a zero chunk.
    @HexBytes public var sha256: [UInt8]

    public init(encoding: Encoding, offset: UInt64, length: UInt64, sha256: [UInt8]) {
        self.encoding = encoding; self.offset = offset; self.length = length; self.sha256 = sha256
    }

    public static let zero = PackChunk(encoding: .zero, offset: 0, length: 0, sha256: [])
}
