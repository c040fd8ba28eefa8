import AsyncHTTPClient
import FoundationEssentials
import Glibc
import Images
import NIOCore
import SwiftletSystem

/// A Swiftlet pack in an OCI registry, as an artifact (OCI image spec 1.1): an image manifest
/// whose `artifactType` and one layer are `application/vnd.swiftlet.pack.v1`, that layer being
/// the pack file as it is, and whose config is the empty descriptor (`{}`). Any registry that
/// stores OCI manifests stores it; `pack pull` refuses anything else by name.
public enum PackArtifact {
    public static let mediaType = "application/vnd.swiftlet.pack.v1"
    public static let emptyConfigType = "application/vnd.oci.empty.v1+json"
    static let emptyConfig: [UInt8] = Array("{}".utf8)
    /// The largest pack a pull takes (a manifest's declared size is the registry's word).
    public static let maximumSize: Int64 = 1 << 40

    /// The artifact manifest of a pack of `size` bytes with `digest`, named `title`.
    struct Manifest: Codable {
        var schemaVersion = 2
        var mediaType: String? = MediaType.ociManifest
        var artifactType: String?
        var config: Descriptor
        var layers: [Descriptor]
        var annotations: [String: String]?
    }

    static func manifest(packDigest: Digest, size: Int64, title: String, annotations: [String: String]) -> Manifest {
        var layerAnnotations = annotations
        layerAnnotations["org.opencontainers.image.title"] = title
        return Manifest(artifactType: mediaType,
                        config: Descriptor(mediaType: emptyConfigType, digest: Digest.of(emptyConfig), size: Int64(emptyConfig.count)),
                        layers: [Descriptor(mediaType: mediaType, digest: packDigest, size: size, annotations: layerAnnotations)],
                        annotations: nil)
    }

    /// The pack layer of a manifest a registry sent for `what`, checked: an OCI manifest whose
    /// artifact type (or, from registries that drop the field, config type) and one layer say
    /// Swiftlet pack, of a size a pull takes.
    static func packLayer(of bytes: [UInt8], what: String) throws(SwiftletError) -> Descriptor {
        let manifest = try decodeDocument(Manifest.self, from: bytes, what: "the manifest of \(what)")
        let isPack = manifest.artifactType == mediaType || (manifest.artifactType == nil && manifest.config.mediaType == emptyConfigType)
        guard isPack, manifest.layers.count == 1, let layer = manifest.layers.first, layer.mediaType == mediaType else {
            let kind = manifest.artifactType ?? manifest.config.mediaType
            throw SwiftletError(.invalidFormat, "\(what) is not a Swiftlet pack (its manifest is of \(kind), with \(manifest.layers.count) layers): `swiftlet pack push` puts packs in a registry; images are pulled with `swiftlet image pull`")
        }
        guard layer.size > 0, layer.size <= maximumSize else {
            throw SwiftletError(.invalidFormat, "\(what) declares a pack of \(layer.size) bytes")
        }
        return layer
    }
}

extension RegistrySource {
    /// Pushes the pack at `path` (`size` bytes, of SHA-256 `digest`) as this reference's
    /// artifact: its blob (unless the registry has it), the empty config, then the manifest.
    /// Returns the manifest's digest.
    public func pushPack(_ path: String, digest: Digest, size: Int64, annotations: [String: String] = [:],
                         progress: @Sendable (String) -> Void) async throws(SwiftletError) -> Digest {
        guard reference.digest == nil else {
            throw SwiftletError(.invalidArgument, "\(displayName): a pack is pushed to a tag, not a digest")
        }
        let title = String(path.split(separator: "/").last ?? "pack.swiftlet")
        progress("pushing \(title) (\(ImagePuller.formatSize(size))) to \(displayName)")
        try await pushBlob(digest: digest, what: "the pack", body: .file(path, size: size))
        let config = PackArtifact.emptyConfig
        try await pushBlob(digest: Digest.of(config), what: "the pack's config", body: .bytes(config))
        let manifest = PackArtifact.manifest(packDigest: digest, size: size, title: title, annotations: annotations)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let bytes: [UInt8]
        do { bytes = Array(try encoder.encode(manifest)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the pack's manifest: \(error)")
        }
        _ = try await send("PUT", "\(base)/manifests/\(reference.manifestReference)", expecting: [201],
                           headers: [("Content-Type", MediaType.ociManifest)], what: "the manifest of \(displayName)", refusal: pushRefusal, body: .bytes(bytes))
        return Digest.of(bytes)
    }

    /// What a refused push says it was refused, and what to do.
    private var pushRefusal: (target: String, hint: String) {
        ("to push to \(reference.repository)", "set SWIFTLET_REGISTRY_USER and SWIFTLET_REGISTRY_PASSWORD to a user that may")
    }

    /// Uploads a blob unless the registry has it: a POST for an upload session, then one PUT of
    /// the whole (a monolithic upload).
    private func pushBlob(digest: Digest, what: String, body: RequestBody) async throws(SwiftletError) {
        let existing = try await send("HEAD", "\(base)/blobs/\(digest)", expecting: [200, 404], what: "\(what) in \(displayName)", refusal: pushRefusal)
        if existing.status.code == 200 { return }
        let session = try await send("POST", "\(base)/blobs/uploads/", expecting: [202], what: "an upload of \(what) to \(displayName)", refusal: pushRefusal)
        guard let location = session.headers.first(name: "location"), !location.isEmpty else {
            throw SwiftletError(.invalidFormat, "the registry \(reference.registry) opened an upload without saying where (no Location)")
        }
        var url = Self.resolve(location, against: "\(base)/blobs/uploads/")
        guard ["http", "https"].contains(Self.scheme(of: url)) else {
            throw SwiftletError(.invalidFormat, "the registry \(reference.registry) sent an upload location that is not an http or https URL")
        }
        url += (url.contains("?") ? "&" : "?") + "digest=" + Self.percentEncode(digest.description)
        _ = try await send("PUT", url, expecting: [201], headers: [("Content-Type", "application/octet-stream")],
                           what: "\(what) to \(displayName)", refusal: pushRefusal, body: body)
    }

    /// Pulls this reference's pack into a new file beside `output` (streamed, its SHA-256 and
    /// size checked against the manifest), then renames it to `output`. Returns the manifest's digest.
    public func pullPack(to output: String, progress: @Sendable (String) -> Void) async throws(SwiftletError) -> Digest {
        let (bytes, _) = try await root()
        let layer = try PackArtifact.packLayer(of: bytes, what: displayName)
        progress("pulling \(displayName) (\(ImagePuller.formatSize(layer.size)))")
        let response = try await get("\(base)/blobs/\(layer.digest)", accept: [], what: "the pack of \(displayName)")
        try await OwnedFileDescriptor.writeIntoPlace(output) { file async throws(SwiftletError) in
            let fd = file.rawValue
            var hasher = SHA256()
            var written: Int64 = 0
            try await Self.collect(response, what: "the pack of \(displayName)", limit: layer.size) { chunk throws(SwiftletError) in
                hasher.update(chunk)
                try OwnedFileDescriptor.writeAll(fd: fd, chunk)
                written += Int64(chunk.count)
            }
            let got = Digest(bytes: hasher.finalize())
            guard written == layer.size, got == layer.digest else {
                throw SwiftletError(.invalidFormat, "the pack \(displayName) arrived damaged (\(written) of \(layer.size) bytes, \(got)): nothing was written to \(output)")
            }
            try systemCall("cannot write \(output) to disk") { fsync(fd) }
        }
        return Digest.of(bytes)
    }
}

/// What a request sends: bytes, or a file's first `size` bytes (streamed; opened anew for each
/// attempt).
enum RequestBody: Sendable {
    case bytes([UInt8])
    case file(String, size: Int64)
}

/// A file's bytes as an async sequence of buffers (1 MiB each), for streaming a request body
/// without holding the file in memory.
struct FileChunks: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    let file: ReadOnlyFile
    let size: Int64

    init(path: String, size: Int64) throws(SwiftletError) {
        file = ReadOnlyFile(try OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY | O_CLOEXEC, what: path))
        self.size = size
    }

    /// An open file shared by the sequence and its iterators, closed when the last goes.
    final class ReadOnlyFile: Sendable {
        let fd: Int32
        init(_ file: consuming OwnedFileDescriptor) { fd = file.release() }
        deinit { _ = OwnedFileDescriptor(taking: fd) }
    }

    struct AsyncIterator: AsyncIteratorProtocol {
        let file: ReadOnlyFile
        let size: Int64
        var offset: Int64 = 0

        mutating func next() async throws -> ByteBuffer? {
            guard offset < size else { return nil }
            let count = Int(Swift.min(Int64(1 << 20), size - offset))
            let bytes = try Self.read(fd: file.fd, count: count, at: UInt64(offset))
            offset += Int64(count)
            return ByteBuffer(bytes: bytes)
        }

        /// (Not in `next`: Swift 6.3 crashes compiling a typed-throws buffer closure in an async function.)
        static func read(fd: Int32, count: Int, at offset: UInt64) throws(SwiftletError) -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: count)
            try bytes.withMutableBytes { raw throws(SwiftletError) in
                try OwnedFileDescriptor.read(fd: fd, into: raw, at: offset, what: "the pack")
            }
            return bytes
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(file: file, size: size) }
}
