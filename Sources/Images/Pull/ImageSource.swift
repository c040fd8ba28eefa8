import Glibc
import SwiftletSystem

/// Where an image comes from: a registry, an OCI layout directory, or an archive already unpacked
/// into the store. A source yields the top-level document and puts blobs into the store, verified.
public protocol ImageSource: Sendable {
    /// What the user named, for messages (`docker.io/library/busybox:latest`, `./image-dir`).
    var displayName: String { get }
    /// The name the image is recorded under, if the source gives one.
    var imageName: String? { get }
    /// The top-level document: an index, a manifest list, or a manifest, with its media type
    /// when the source states it.
    func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?)
    /// Makes sure the blob `descriptor` names is in `store` (checked against its digest and size).
    func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError)
}

/// Puts the image a source holds into the store: chooses the manifest for the platform, fetches
/// the config and the layers (shared ones once), converts each layer to a guest disk once per
/// diff ID, and records the image. Nothing is recorded unless all of it succeeded.
public struct ImagePuller: Sendable {
    public var platform: Platform
    /// Called with progress lines ("fetching layer 2/3 ...").
    public var progress: @Sendable (String) -> Void

    public init(platform: Platform = .host, progress: @escaping @Sendable (String) -> Void = { _ in }) {
        self.platform = platform
        self.progress = progress
    }

    public func pull(from source: some ImageSource, into store: ImageStore) async throws(SwiftletError) -> StoredImage {
        let (rootBytes, rootType) = try await source.root()
        var (manifestBytes, manifestDigest) = (rootBytes, Digest.of(rootBytes))
        var mediaType = try Self.mediaType(of: rootBytes, stated: rootType, what: "the top-level document of \(source.displayName)")
        var depth = 0
        while MediaType.indexes.contains(mediaType) {
            depth += 1
            guard depth <= 4 else { throw SwiftletError(.invalidFormat, "\(source.displayName): image indexes nest too deeply") }
            let index = try decodeDocument(ImageIndex.self, from: manifestBytes, what: "the image index of \(source.displayName)")
            let chosen = try choose(from: index, source: source)
            try await source.fetch(chosen, into: store, what: "manifest \(chosen.digest)")
            manifestBytes = try store.readBlob(chosen.digest, what: "manifest")
            manifestDigest = chosen.digest
            mediaType = try Self.mediaType(of: manifestBytes, stated: chosen.mediaType, what: "manifest \(chosen.digest)")
        }
        guard MediaType.manifests.contains(mediaType) else {
            throw SwiftletError(.unsupported, "\(source.displayName): unsupported manifest type \(mediaType) (Swiftlet reads OCI and Docker v2 images)")
        }
        try store.putBlob(manifestBytes, expected: manifestDigest, what: "manifest of \(source.displayName)")
        let manifest = try decodeDocument(ImageManifest.self, from: manifestBytes, what: "the manifest of \(source.displayName)")
        let totalSize = try Self.checkSizes(manifest, manifestBytes: manifestBytes.count, what: "the manifest of \(source.displayName)")
        guard MediaType.configs.contains(manifest.config.mediaType) else {
            throw SwiftletError(.unsupported, "\(source.displayName) is not a container image: its config is \(manifest.config.mediaType)")
        }
        for layer in manifest.layers where !MediaType.layers.contains(layer.mediaType) {
            throw SwiftletError(.unsupported, "\(source.displayName): unsupported layer type \(layer.mediaType) in layer \(layer.digest)")
        }
        try await source.fetch(manifest.config, into: store, what: "image config \(manifest.config.digest)")
        let configBytes = try store.readBlob(manifest.config.digest, what: "image config")
        let config = try decodeDocument(ImageConfiguration.self, from: configBytes, what: "the image config of \(source.displayName)")
        guard config.os == platform.os, config.architecture == platform.architecture else {
            throw SwiftletError(.unsupported, "\(source.displayName) is an image for \(config.platform); Swiftlet runs \(platform) guests")
        }
        guard config.rootfs.diff_ids.count == manifest.layers.count else {
            throw SwiftletError(.invalidFormat, "\(source.displayName): the config lists \(config.rootfs.diff_ids.count) layers, the manifest \(manifest.layers.count)")
        }
        let limits = ImportLimits.current
        for (number, layer) in manifest.layers.enumerated() {
            let what = "layer \(number + 1)/\(manifest.layers.count) (\(layer.digest.short), \(Self.formatSize(layer.size)))"
            if !store.hasBlob(layer.digest) {
                // The declared size bounds the download: refuse what could never be a layer, or fill the disk.
                guard UInt64(clamping: layer.size) <= limits.maxLayerBytes else {
                    throw SwiftletError(.invalidFormat, "\(source.displayName): \(what) is larger than a layer may be (\(limits.maxLayerBytes) bytes; SWIFTLET_MAX_LAYER_SIZE raises it)")
                }
                try store.requireSpace(UInt64(clamping: layer.size), limits: limits, what: what)
                progress("fetching \(what)")
                try await source.fetch(layer, into: store, what: "layer \(layer.digest)")
            }
        }
        let image = StoredImage(
            name: source.imageName, manifest: manifestDigest, config: manifest.config.digest,
            layers: manifest.layers.map(\.digest), diffIDs: config.rootfs.diff_ids, platform: config.platform.description,
            size: totalSize,
            added: Int64(time(nil)))
        _ = try store.disks(for: image, progress: progress)
        try store.record(image)
        return image
    }

    /// Most layers an image may have (Docker's limit is 127; OCI sets none).
    public static let maximumLayers = 256

    /// Checks the sizes a manifest declares (none negative, the layer count bounded) and returns
    /// the image's total size; declared sizes are untrusted, so the sum is checked too.
    static func checkSizes(_ manifest: ImageManifest, manifestBytes: Int, what: String) throws(SwiftletError) -> Int64 {
        guard manifest.layers.count <= maximumLayers else {
            throw SwiftletError(.invalidFormat, "\(what) lists \(manifest.layers.count) layers; Swiftlet takes at most \(maximumLayers)")
        }
        var total = Int64(manifestBytes)
        for descriptor in [manifest.config] + manifest.layers {
            guard descriptor.size >= 0 else {
                throw SwiftletError(.invalidFormat, "\(what) declares a negative size (\(descriptor.size)) for \(descriptor.digest)")
            }
            let (sum, overflow) = total.addingReportingOverflow(descriptor.size)
            guard !overflow else { throw SwiftletError(.invalidFormat, "\(what) declares sizes that add up to more than 2^63 bytes") }
            total = sum
        }
        return total
    }

    /// Picks the manifest for `platform` from an index.
    func choose(from index: ImageIndex, source: some ImageSource) throws(SwiftletError) -> Descriptor {
        let candidates = index.manifests.filter { MediaType.manifests.contains($0.mediaType) || MediaType.indexes.contains($0.mediaType) }
        // Attestations and signatures ride in indexes as "unknown/unknown" manifests: never images.
        let platformed = candidates.filter { $0.platform != nil && $0.platform?.os != "unknown" }
        if let match = platformed.first(where: { $0.platform?.os == platform.os && $0.platform?.architecture == platform.architecture }) {
            return match
        }
        if platformed.isEmpty {
            // A layout of one image (skopeo's oci:DIR:TAG) states no platform: the config's is checked next.
            guard candidates.count == 1 else {
                throw SwiftletError(.invalidArgument, "\(source.displayName) holds \(candidates.count) images and states no platforms: name one by tag")
            }
            return candidates[0]
        }
        let offered = platformed.compactMap { $0.platform?.description }
        throw SwiftletError(.unsupported, "\(source.displayName) has no \(platform) image (it has \(offered.isEmpty ? "none" : offered.joined(separator: ", ")))")
    }

    /// The media type of a JSON document: as stated by the transport, else its own mediaType field,
    /// else guessed from its shape (an OCI index or manifest may omit it).
    static func mediaType(of bytes: [UInt8], stated: String?, what: String) throws(SwiftletError) -> String {
        struct Probe: Decodable {
            var schemaVersion: Int?
            var mediaType: String?
            var manifests: [IgnoredValue]?
            var config: IgnoredValue?
        }
        struct IgnoredValue: Decodable { init(from decoder: any Decoder) throws {} }
        let probe = try decodeDocument(Probe.self, from: bytes, what: what)
        if probe.schemaVersion == 1 {
            throw SwiftletError(.unsupported, "\(what) is a Docker schema 1 manifest, which Swiftlet does not read (push the image again with a current tool)")
        }
        if let stated = stated?.split(separator: ";").first.map({ String($0).trimmingSpaces }), stated != "application/json", !stated.isEmpty {
            return stated
        }
        if let own = probe.mediaType { return own }
        if probe.manifests != nil { return MediaType.ociIndex }
        if probe.config != nil { return MediaType.ociManifest }
        throw SwiftletError(.invalidFormat, "\(what) is neither an image index nor a manifest")
    }

    public static func formatSize(_ bytes: Int64) -> String {
        if bytes >= 1 << 20 { return "\(bytes >> 20).\(((bytes & 0xF_FFFF) * 10) >> 20) MiB" }
        if bytes >= 1 << 10 { return "\(bytes >> 10) KiB" }
        return "\(bytes) B"
    }
}

extension String {
    /// The string without leading and trailing spaces.
    public var trimmingSpaces: String {
        String(drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " }).reversed())
    }
}
