import Glibc
import SwiftletSystem
import Synchronization

/// One image the store knows by name (or only by digest, for an unnamed import).
public struct StoredImage: Codable, Sendable, Equatable {
    /// `docker.io/library/busybox:latest`, or nil for an image imported without a name.
    public var name: String?
    /// The digest of the image manifest: the image's identity.
    public var manifest: Digest
    public var config: Digest
    /// Compressed layer blobs, bottom first.
    public var layers: [Digest]
    /// Uncompressed layer digests (the config's diff IDs), bottom first: the converted disks' keys.
    public var diffIDs: [Digest]
    public var platform: String
    /// Bytes of the manifest, config and layer blobs.
    public var size: Int64
    /// When the store recorded it (seconds since the epoch).
    public var added: Int64
}

/// Swiftlet's content store: blobs addressed by sha256 and verified on the way in, layers converted
/// to read-only guest disks once per uncompressed digest, and the names that point at images.
///
/// Layout under `root` (`$SWIFTLET_HOME`, else `~/.local/share/swiftlet`):
/// `blobs/sha256/HEX` (manifests, configs, layers as fetched), `disks/sha256/HEX.erofs` (one per diff
/// ID), `images.json` (names), `tmp/` (work in progress, never read as content), `lock`.
/// Every file appears by rename when complete, so a failed or interrupted pull leaves nothing that
/// looks like content. Readers and writers hold `lock` shared; `rm` and `prune` hold it exclusively.
public final class ImageStore: @unchecked Sendable {
    // SAFETY (Sendable): immutable paths and a lock descriptor; file state is serialised by flock.
    public let root: String
    private let lockFD: Int32

    /// The root set with `useDefaultRoot`, for this process (nil: from the environment).
    private static let chosenRoot = Mutex<String?>(nil)

    /// Makes `root` this process's default root (nil: back to the environment's). A program that
    /// embeds Swiftlet calls it before any work; the processes Swiftlet starts get it as
    /// `$SWIFTLET_HOME`.
    public static func useDefaultRoot(_ root: String?) {
        chosenRoot.withLock { $0 = root }
    }

    /// The default root: the one set with `useDefaultRoot`, else `$SWIFTLET_HOME`, else
    /// `$XDG_DATA_HOME/swiftlet`, else `~/.local/share/swiftlet`.
    public static func defaultRoot() -> String {
        if let chosen = chosenRoot.withLock({ $0 }) { return chosen }
        if let home = getenv("SWIFTLET_HOME").map({ String(cString: $0) }), !home.isEmpty { return home }
        if let data = getenv("XDG_DATA_HOME").map({ String(cString: $0) }), !data.isEmpty { return data + "/swiftlet" }
        let home = getenv("HOME").map { String(cString: $0) } ?? "/root"
        return home + "/.local/share/swiftlet"
    }

    /// Opens (creating when needed, with its missing parents) the store at `root` and takes its lock shared.
    public init(root: String = ImageStore.defaultRoot()) throws(SwiftletError) {
        self.root = root
        try makeDirectories(root, mode: 0o700) // everything Swiftlet keeps is the user's alone
        for directory in [root + "/blobs", root + "/blobs/sha256", root + "/disks", root + "/disks/sha256", root + "/tmp"] {
            try Self.makeDirectory(directory)
        }
        lockFD = try systemCall("cannot open the image store's lock \(root)/lock") { open(root + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
        try lock(LOCK_SH)
    }

    deinit { close(lockFD) }

    /// Throws unless the store's file system has room for `bytes` more plus `limits`' reserve.
    public func requireSpace(_ bytes: UInt64, limits: ImportLimits = .current, what: String) throws(SwiftletError) {
        try limits.requireSpace(bytes, fd: lockFD, what: what)
    }

    static func makeDirectory(_ path: String) throws(SwiftletError) {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw SwiftletError.system("cannot create \(path) for the image store", errno: currentErrno)
        }
    }

    private func lock(_ operation: Int32) throws(SwiftletError) {
        let fd = lockFD
        try systemCall("cannot lock the image store \(root)") { flock(fd, operation) }
    }

    /// Runs `body` with the store locked exclusively (no pull or run in progress), then shares it again.
    func exclusively<T>(_ body: () throws(SwiftletError) -> T) throws(SwiftletError) -> T {
        try lock(LOCK_EX)
        defer { try? lock(LOCK_SH) }
        return try body()
    }

    // MARK: Blobs

    public func blobPath(_ digest: Digest) -> String { "\(root)/blobs/sha256/\(digest.hex)" }
    public func diskPath(diffID: Digest) -> String { "\(root)/disks/sha256/\(diffID.hex).erofs" }

    public func hasBlob(_ digest: Digest) -> Bool { access(blobPath(digest), F_OK) == 0 }

    /// A new temporary file in the store's `tmp/`, for content on its way in.
    func temporaryFile(_ prefix: String) throws(SwiftletError) -> NamedFile {
        try OwnedFileDescriptor.temporaryFile(in: root + "/tmp", prefix: prefix)
    }

    /// Writes a blob whose bytes are in memory, after checking them against `expected`.
    @discardableResult
    public func putBlob(_ bytes: [UInt8], expected: Digest? = nil, what: String) throws(SwiftletError) -> Digest {
        let digest = Digest.of(bytes)
        if let expected, expected != digest {
            throw SwiftletError(.invalidFormat, "\(what) does not match its digest: expected \(expected), got \(digest)")
        }
        if hasBlob(digest) { return digest }
        let writer = try BlobWriter(store: self, what: what)
        try bytes.withBytes { raw throws(SwiftletError) in try writer.write(raw) }
        try writer.commit(expected: digest, size: nil)
        return digest
    }

    /// Reads a small blob (manifest, config) whole, checking it against its digest again.
    public func readBlob(_ digest: Digest, what: String, limit: Int = 16 << 20) throws(SwiftletError) -> [UInt8] {
        let bytes: [UInt8]
        do { bytes = try OwnedFileDescriptor.readSmallFile(blobPath(digest), limit: limit) } catch {
            throw SwiftletError(.notFound, "\(what) \(digest) is not in the image store \(root)", cause: error.cause)
        }
        guard Digest.of(bytes) == digest else {
            throw SwiftletError(.invalidFormat, "\(what) \(digest) in the image store is corrupt: run `swiftlet image rm` and pull it again")
        }
        return bytes
    }

    // MARK: Names

    private var indexPath: String { root + "/images.json" }

    private struct Index: Codable { var images: [StoredImage] }

    /// Every image the store has, in the order recorded.
    public func images() throws(SwiftletError) -> [StoredImage] {
        guard access(indexPath, F_OK) == 0 else { return [] }
        let bytes = try OwnedFileDescriptor.readSmallFile(indexPath, limit: 64 << 20)
        return try decodeDocument(Index.self, from: bytes, what: "the image store's index \(indexPath)").images
    }

    /// Finds an image by name (`busybox`, `docker.io/library/busybox:latest`), manifest digest or its prefix.
    public func find(_ text: String) throws(SwiftletError) -> StoredImage? {
        let all = try images()
        if let reference = try? ImageReference(parsing: text), let match = all.last(where: { $0.name == reference.description }) {
            return match
        }
        if let match = all.last(where: { $0.name == text }) { return match }
        let hex = text.hasPrefix("sha256:") ? String(text.dropFirst(7)) : text
        guard hex.count >= 6 else { return nil }
        let matches = all.filter { $0.manifest.hex.hasPrefix(hex) }
        return Set(matches.map(\.manifest)).count == 1 ? matches.last : nil
    }

    /// Records `image` (replacing an image of the same name; an unnamed one replaces the same digest).
    public func record(_ image: StoredImage) throws(SwiftletError) {
        try updateIndex { images in
            images.removeAll { $0.name == image.name && (image.name != nil || $0.manifest == image.manifest) }
            images.append(image)
        }
    }

    /// Rewrites the index under an exclusive lock of its own, atomically (temporary file and rename).
    func updateIndex(_ change: (inout [StoredImage]) throws(SwiftletError) -> Void) throws(SwiftletError) {
        let indexLock = try OwnedFileDescriptor.open(root + "/images.lock", flags: O_RDWR | O_CREAT, mode: 0o600, what: "the image index lock")
        let fd = indexLock.rawValue
        try systemCall("cannot lock the image index") { flock(fd, LOCK_EX) }
        var all = try images()
        try change(&all)
        let bytes = try JSONCoding.encode(Index(images: all), pretty: true)
        let file = try temporaryFile("images.json")
        let path = file.path
        do {
            try bytes.withBytes { raw throws(SwiftletError) in try file.descriptor.writeAll(raw) }
            let raw = file.descriptor.rawValue
            try systemCall("cannot flush \(path)") { fsync(raw) }
            try systemCall("cannot replace \(indexPath)") { rename(path, indexPath) }
        } catch {
            unlink(path)
            throw error
        }
    }

    // MARK: Removal

    /// Forgets the named image, then deletes whatever no remaining image uses, except the layer
    /// disks in `keepingDisks` (paths: disks that machines outside the store still boot from).
    /// Returns the number of bytes freed.
    @discardableResult
    public func remove(_ text: String, keepingDisks kept: Set<String> = []) throws(SwiftletError) -> Int64 {
        guard let image = try find(text) else {
            throw SwiftletError(.notFound, "no image \(text.debugDescription) in the image store (see `swiftlet image ls`)")
        }
        return try exclusively { () throws(SwiftletError) -> Int64 in
            try updateIndex { images in
                images.removeAll { $0.manifest == image.manifest && $0.name == image.name }
            }
            return try collectGarbage(keepingDisks: kept)
        }
    }

    /// Deletes blobs, disks and temporary files that no image uses (and first the images that
    /// have no name, with `unnamedImages`), except the layer disks in `keepingDisks`. Returns the
    /// bytes freed.
    @discardableResult
    public func prune(unnamedImages: Bool = false, keepingDisks kept: Set<String> = []) throws(SwiftletError) -> Int64 {
        try exclusively { () throws(SwiftletError) -> Int64 in
            if unnamedImages { try updateIndex { images in images.removeAll { $0.name == nil } } }
            return try collectGarbage(keepingDisks: kept)
        }
    }

    /// With the store held exclusively: removes everything unreachable from the index and not in
    /// `kept` (disk paths; those outside this store's disk directory are ignored).
    private func collectGarbage(keepingDisks kept: Set<String>) throws(SwiftletError) -> Int64 {
        let images = try images()
        var blobs = Set<String>()
        var disks = Set(kept.compactMap(storeDiskName))
        for image in images {
            for digest in [image.manifest, image.config] + image.layers { blobs.insert(digest.hex) }
            for group in Self.diskGroups(layerCount: image.diffIDs.count) {
                disks.insert(Self.diskKey(image.diffIDs[group]).hex + ".erofs")
            }
        }
        var freed: Int64 = 0
        freed += try removeEntries(in: root + "/blobs/sha256") { !blobs.contains($0) }
        freed += try removeEntries(in: root + "/disks/sha256") { !disks.contains($0) }
        freed += try removeEntries(in: root + "/tmp") { _ in true }
        return freed
    }

    /// The name in `disks/sha256` of the disk at `path`, if it is one of this store's (however the
    /// path spells the store's directory); nil otherwise or if it no longer exists.
    private func storeDiskName(_ path: String) -> String? {
        func real(_ p: String) -> String? {
            guard let r = realpath(p, nil) else { return nil }
            defer { free(r) }
            return String(cString: r)
        }
        guard let disk = real(path), let directory = real(root + "/disks/sha256"), disk.hasPrefix(directory + "/") else { return nil }
        let name = disk.dropFirst(directory.count + 1)
        return name.contains("/") ? nil : String(name)
    }

    private func removeEntries(in directory: String, where shouldRemove: (String) -> Bool) throws(SwiftletError) -> Int64 {
        guard let entries = OwnedFileDescriptor.directoryEntries(directory) else {
            throw SwiftletError.system("cannot list \(directory)", errno: currentErrno)
        }
        var freed: Int64 = 0
        for (name, _) in entries where shouldRemove(name) {
            var info = stat()
            let path = directory + "/" + name
            if stat(path, &info) == 0 { freed += Int64(info.st_size) }
            if unlink(path) != 0 { throw SwiftletError.system("cannot remove \(path)", errno: currentErrno) }
        }
        return freed
    }
}
