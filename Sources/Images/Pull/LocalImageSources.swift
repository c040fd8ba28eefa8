import Glibc
import SwiftletSystem

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`), as skopeo,
/// umoci, buildah and `docker save` (25 and later, unpacked) write it.
public struct OCILayoutSource: ImageSource {
    public let directory: String
    /// Keep only index entries with this `org.opencontainers.image.ref.name` (`DIR:TAG`).
    public let tag: String?
    /// From the index's annotations and the tag (see `LocalImageName`); nil leaves the image unnamed.
    public let imageName: String?
    private let index: [UInt8]

    public init(directory: String, tag: String? = nil) throws(SwiftletError) {
        self.directory = directory
        self.tag = tag
        guard access(directory + "/oci-layout", F_OK) == 0, access(directory + "/index.json", F_OK) == 0 else {
            throw SwiftletError(.invalidFormat, "\(directory) is not an OCI image layout (no oci-layout and index.json)")
        }
        let what = directory + (tag.map { ":" + $0 } ?? "")
        index = try filterIndex(try OwnedFileDescriptor.readSmallFile(directory + "/index.json", limit: 16 << 20), tag: tag, what: what)
        // An index that does not decode is reported by the pull, which reads it as its top-level document.
        imageName = (try? decodeDocument(ImageIndex.self, from: index, what: what)).flatMap { LocalImageName.name(of: $0, tag: tag) }
    }

    public var displayName: String { directory + (tag.map { ":" + $0 } ?? "") }

    public func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?) { (index, MediaType.ociIndex) }

    public func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError) {
        if store.hasBlob(descriptor.digest) { return }
        let path = "\(directory)/blobs/sha256/\(descriptor.digest.hex)"
        let input: OwnedFileDescriptor
        do { input = try OwnedFileDescriptor.open(path, flags: O_RDONLY) } catch {
            throw SwiftletError(.notFound, "\(displayName) lacks \(what) (no \(path))", cause: error.cause)
        }
        let writer = try BlobWriter(store: store, what: "\(what) of \(displayName)")
        var buffer = [UInt8](repeating: 0, count: 1 << 17)
        let fd = input.rawValue
        while true {
            let n = try buffer.withMutableBytes { raw throws(SwiftletError) in
                try systemCall("cannot read \(path)") { read(fd, raw.baseAddress, raw.count) }
            }
            if n == 0 { break }
            try buffer.withBytes { raw throws(SwiftletError) in try writer.write(UnsafeRawBufferPointer(rebasing: raw[..<n])) }
        }
        try writer.commit(expected: descriptor.digest, size: descriptor.size)
    }
}

/// Keeps the entries of an index whose ref name is `tag` (all of them when `tag` is nil).
func filterIndex(_ bytes: [UInt8], tag: String?, what: String) throws(SwiftletError) -> [UInt8] {
    guard let tag else { return bytes }
    var index = try decodeDocument(ImageIndex.self, from: bytes, what: "the index of \(what)")
    index.manifests.removeAll { entry in
        let name = entry.annotations?[LocalImageName.refNameKey] ?? ""
        return name != tag && !name.hasSuffix(":" + tag)
    }
    guard !index.manifests.isEmpty else { throw SwiftletError(.notFound, "\(what): no image tagged \(tag.debugDescription)") }
    return try JSONCoding.encode(index)
}

/// An image archive (`docker save` output, legacy or OCI, or an OCI layout in a tar) streamed into
/// the store: every blob is verified as it is read and written once; the small top-level
/// documents are kept in memory.
public struct ArchiveSource: ImageSource {
    public let displayName: String
    public let imageName: String?
    private let rootDocument: [UInt8]
    private let rootType: String

    /// Reads the archive from `fd` (a file or a pipe: it is read once, front to back).
    public init(reading fd: Int32, displayName: String, tag: String? = nil, into store: ImageStore) throws(SwiftletError) {
        self.displayName = displayName
        var reader = TarReader { buffer throws(SwiftletError) in
            try systemCall("cannot read \(displayName)") { read(fd, buffer.baseAddress, buffer.count) }
        }
        var documents: [String: [UInt8]] = [:]
        var files: [String: (digest: Digest, size: Int64)] = [:]
        do throws(SwiftletError) {
            while let entry = try reader.next() {
                var path = entry.path
                while path.hasPrefix("./") { path.removeFirst(2) }
                // docker save links layers it lists twice (`ID/layer.tar` → `../DIGEST.tar`).
                if case .symlink(let target) = entry.kind {
                    let directory = path.split(separator: "/").dropLast().joined(separator: "/")
                    let resolved = Self.normalize(target.hasPrefix("/") ? String(target.dropFirst()) : directory.isEmpty ? target : directory + "/" + target)
                    if let file = files[resolved] { files[path] = file }
                    continue
                }
                guard entry.kind == .file else { continue }
                if ["index.json", "manifest.json", "oci-layout", "repositories"].contains(path) {
                    guard entry.size <= 16 << 20 else { throw SwiftletError(.invalidFormat, "\(displayName): \(path) is implausibly large") }
                    var bytes = [UInt8](repeating: 0, count: Int(entry.size))
                    try bytes.withMutableBytes { raw throws(SwiftletError) in try Self.readFully(&reader, into: raw, what: path, archive: displayName) }
                    documents[path] = bytes
                    continue
                }
                let expected: Digest? = path.hasPrefix("blobs/sha256/") ? try Digest(parsing: "sha256:" + path.dropFirst(13)) : nil
                guard let size = Int64(exactly: entry.size) else { throw SwiftletError(.invalidFormat, "\(path) is implausibly large") }
                if let expected, store.hasBlob(expected) { files[path] = (expected, size); continue }
                let writer = try BlobWriter(store: store, what: "\(path) in \(displayName)")
                var buffer = [UInt8](repeating: 0, count: 1 << 17)
                while true {
                    let n = try buffer.withMutableBytes { raw throws(SwiftletError) in try reader.read(into: raw) }
                    if n == 0 { break }
                    try buffer.withBytes { raw throws(SwiftletError) in try writer.write(UnsafeRawBufferPointer(rebasing: raw[..<n])) }
                }
                guard writer.written == size else {
                    throw SwiftletError(.invalidFormat, "\(displayName) is truncated in \(path)")
                }
                let digest = try writer.commit(expected: expected ?? writer.digestSoFar(), size: size)
                files[path] = (digest, size)
            }
        } catch {
            throw SwiftletError(error.code, "\(displayName) is not a readable image archive: \(error.message)", cause: error.cause)
        }
        if let index = documents["index.json"] {
            rootDocument = try filterIndex(index, tag: tag, what: displayName)
            rootType = MediaType.ociIndex
            let parsed = try decodeDocument(ImageIndex.self, from: rootDocument, what: "the index of \(displayName)")
            imageName = LocalImageName.name(of: parsed, tag: tag)
        } else if let legacy = documents["manifest.json"] {
            (rootDocument, imageName) = try Self.manifest(fromDockerSave: legacy, files: files, tag: tag, archive: displayName)
            rootType = MediaType.dockerManifest
        } else {
            throw SwiftletError(.invalidFormat, "\(displayName) is not an image archive: it has neither index.json (OCI) nor manifest.json (docker save)")
        }
    }

    public func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?) { (rootDocument, rootType) }

    public func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError) {
        guard store.hasBlob(descriptor.digest) else { throw SwiftletError(.notFound, "\(displayName) lacks \(what)") }
    }

    /// `a/../b/./c` → `b/c`.
    static func normalize(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/") {
            if part == "." { continue }
            if part == ".." { _ = parts.popLast(); continue }
            parts.append(part)
        }
        return parts.joined(separator: "/")
    }

    private static func readFully(_ reader: inout TarReader, into buffer: UnsafeMutableRawBufferPointer, what: String, archive: String) throws(SwiftletError) {
        var done = 0
        while done < buffer.count {
            let n = try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { throw SwiftletError(.invalidFormat, "\(archive) is truncated in \(what)") }
            done += n
        }
    }

    /// `docker save`'s own format: manifest.json lists each image's config file and layer tars.
    /// Swiftlet writes the equivalent Docker v2 manifest, so the image has a manifest digest too.
    static func manifest(fromDockerSave bytes: [UInt8], files: [String: (digest: Digest, size: Int64)], tag: String?, archive: String)
        throws(SwiftletError) -> ([UInt8], String?)
    {
        struct Entry: Decodable { var Config: String; var RepoTags: [String]?; var Layers: [String] }
        let entries = try decodeDocument([Entry].self, from: bytes, what: "manifest.json of \(archive)")
        let chosen: Entry
        var repoTag: String?
        if let tag {
            func matches(_ repoTag: String) -> Bool { repoTag == tag || repoTag.hasSuffix(":" + tag) }
            guard let match = entries.first(where: { ($0.RepoTags ?? []).contains(where: matches) }) else {
                throw SwiftletError(.notFound, "\(archive): no image tagged \(tag.debugDescription)")
            }
            chosen = match
            repoTag = match.RepoTags?.first(where: matches)
        } else {
            guard entries.count == 1 else {
                throw SwiftletError(.invalidArgument, "\(archive) holds \(entries.count) images: name one as \(archive):TAG")
            }
            chosen = entries[0]
            repoTag = chosen.RepoTags?.first
        }
        func descriptor(_ path: String, _ mediaType: String) throws(SwiftletError) -> Descriptor {
            guard let file = files[path] else { throw SwiftletError(.notFound, "\(archive) lacks \(path), which its manifest.json lists") }
            return Descriptor(mediaType: mediaType, digest: file.digest, size: file.size)
        }
        let manifest = ImageManifest(
            schemaVersion: 2, mediaType: MediaType.dockerManifest,
            config: try descriptor(chosen.Config, MediaType.dockerConfig),
            layers: try chosen.Layers.map { (path) throws(SwiftletError) in try descriptor(path, "application/vnd.docker.image.rootfs.diff.tar") })
        // As `docker load` names it: the tag picked (else the first), Docker Hub's when no registry is written.
        let name = repoTag.flatMap { try? ImageReference(parsing: $0).description }
        return (try JSONCoding.encode(manifest), name)
    }
}
