import SwiftletSystem

/// Media types of the OCI image spec and their Docker v2 equivalents.
public enum MediaType {
    public static let ociIndex = "application/vnd.oci.image.index.v1+json"
    public static let ociManifest = "application/vnd.oci.image.manifest.v1+json"
    public static let ociConfig = "application/vnd.oci.image.config.v1+json"
    public static let dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
    public static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    public static let dockerConfig = "application/vnd.docker.container.image.v1+json"

    public static let indexes: Set<String> = [ociIndex, dockerManifestList]
    public static let manifests: Set<String> = [ociManifest, dockerManifest]
    public static let configs: Set<String> = [ociConfig, dockerConfig]
    /// Every layer type Swiftlet unpacks: plain, gzip and zstd tar, OCI and Docker, distributable or not.
    public static let layers: Set<String> = [
        "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ]
}

/// A reference to a blob: its media type, digest and size (OCI descriptor).
public struct Descriptor: Codable, Sendable, Equatable {
    public var mediaType: String
    public var digest: Digest
    public var size: Int64
    public var platform: Platform?
    public var annotations: [String: String]?
    public var urls: [String]?

    public init(mediaType: String, digest: Digest, size: Int64, platform: Platform? = nil, annotations: [String: String]? = nil) {
        self.mediaType = mediaType
        self.digest = digest
        self.size = size
        self.platform = platform
        self.annotations = annotations
    }
}

public struct Platform: Codable, Sendable, Equatable, CustomStringConvertible {
    public var architecture: String
    public var os: String
    public var variant: String?

    enum CodingKeys: String, CodingKey { case architecture, os, variant }

    public init(architecture: String, os: String, variant: String? = nil) {
        self.architecture = architecture
        self.os = os
        self.variant = variant
    }

    /// What Swiftlet's guests run: linux on the host's architecture.
    public static let host = Platform(architecture: "amd64", os: "linux")

    public var description: String { "\(os)/\(architecture)" + (variant.map { "/" + $0 } ?? "") }
}

/// An image index (OCI) or manifest list (Docker): one manifest per platform.
public struct ImageIndex: Codable, Sendable {
    public var schemaVersion: Int
    public var mediaType: String?
    public var manifests: [Descriptor]
}

/// An image manifest: the config blob and the layers, bottom first.
public struct ImageManifest: Codable, Sendable {
    public var schemaVersion: Int
    public var mediaType: String?
    public var config: Descriptor
    public var layers: [Descriptor]
}

/// The parts of an image configuration Swiftlet uses.
public struct ImageConfiguration: Codable, Sendable, Equatable {
    public struct Execution: Codable, Sendable, Equatable {
        public var User: String?
        public var Env: [String]?
        public var Entrypoint: [String]?
        public var Cmd: [String]?
        public var WorkingDir: String?
    }
    public struct RootFS: Codable, Sendable, Equatable {
        public var type: String
        public var diff_ids: [Digest]
    }
    public var architecture: String?
    public var os: String?
    public var variant: String?
    public var created: String?
    public var config: Execution?
    public var rootfs: RootFS

    public var platform: Platform { Platform(architecture: architecture ?? "unknown", os: os ?? "unknown", variant: variant) }
}

/// Decodes a JSON document Swiftlet read from an image, with an error that names it.
public func decodeDocument<T: Decodable>(_ type: T.Type, from bytes: [UInt8], what: String) throws(SwiftletError) -> T {
    do {
        return try JSONCoding.decode(T.self, from: bytes)
    } catch {
        throw SwiftletError(.invalidFormat, "\(what) is not a valid document: \(describeDecodingError(error))")
    }
}

extension ImageConfiguration {
    /// Decodes an image config blob.
    public static func decode(_ bytes: [UInt8]) throws(SwiftletError) -> ImageConfiguration {
        try decodeDocument(ImageConfiguration.self, from: bytes, what: "the image config")
    }
}
