import Glibc
import ImageRegistry
import Images
import SwiftletSystem

// swiftlet-pull: pulls one image from a registry into the image store ($SWIFTLET_HOME) and prints
// its manifest digest. `swiftlet` runs it for registry references so that the network client
// (HTTP, TLS) lives in a short-lived process of its own, not in the VMM's.
//
//   swiftlet-pull [--insecure-registry] REFERENCE
//   swiftlet-pull [--insecure-registry] --push-pack FILE REFERENCE
//   swiftlet-pull [--insecure-registry] --pull-pack REFERENCE OUTPUT
//
// The last two move a Swiftlet pack as an OCI artifact (PackArtifact) and print the manifest digest.
// Progress lines and, on failure, one error line go to stderr (the error last); exit 0 or 1.
// Credentials: SWIFTLET_REGISTRY_USER and SWIFTLET_REGISTRY_PASSWORD, for the registry REFERENCE
// names only: they go to it over HTTPS (plain HTTP only for a loopback registry or with
// --insecure-registry), never after a redirect to another host or to HTTP, and to the token
// service it names only over HTTPS from an HTTPS registry (see RegistrySource).

@main
struct SwiftletPull {
    /// Writes `swiftlet: message` to stderr (progress, or the error as the last line).
    @Sendable static func report(_ message: String) {
        _ = try? Array(("swiftlet: " + message + "\n").utf8).withBytes { bytes throws(SwiftletError) in
            try OwnedFileDescriptor.writeAll(fd: 2, bytes)
        }
    }

    static func fail(_ message: String) -> Never {
        report(message)
        exit(1)
    }

    static func main() async {
        var insecure = false
        var mode: String?
        var operands: [String] = []
        for argument in CommandLine.arguments.dropFirst() {
            switch argument {
            case "--insecure-registry": insecure = true
            case "--push-pack", "--pull-pack": mode = argument
            case _ where argument.hasPrefix("-"): fail("swiftlet-pull: unknown option \(argument)")
            default: operands.append(argument)
            }
        }
        guard operands.count == (mode == nil ? 1 : 2) else {
            fail("usage: swiftlet-pull [--insecure-registry] (REFERENCE | --push-pack FILE REFERENCE | --pull-pack REFERENCE OUTPUT)")
        }
        var credentials: (user: String, password: String)?
        if let user = getenv("SWIFTLET_REGISTRY_USER").map({ String(cString: $0) }), !user.isEmpty {
            credentials = (user, getenv("SWIFTLET_REGISTRY_PASSWORD").map { String(cString: $0) } ?? "")
        }
        do {
            // Confined before any byte from a registry arrives: its own seccomp list (files,
            // sockets, no processes), no new privileges, a descriptor bound.
            try Confinement.confine(.pull)
            switch mode {
            case "--push-pack":
                print(try await pushPack(operands[0], to: operands[1], insecure: insecure, credentials: credentials))
            case "--pull-pack":
                let source = RegistrySource(reference: try ImageReference(parsing: operands[0]), insecure: insecure, credentials: credentials)
                print(try await source.pullPack(to: operands[1], progress: report))
            default:
                print(try await pull(operands[0], insecure: insecure, credentials: credentials))
            }
        } catch {
            fail(error.description)
        }
    }

    static func pushPack(_ path: String, to reference: String, insecure: Bool,
                         credentials: (user: String, password: String)?) async throws(SwiftletError) -> Digest {
        let parsed = try ImageReference(parsing: reference)
        let (digest, size) = try digestOfFile(path)
        let source = RegistrySource(reference: parsed, insecure: insecure, credentials: credentials)
        return try await source.pushPack(path, digest: digest, size: size, progress: report)
    }

    /// The SHA-256 and size of the regular file at `path`.
    static func digestOfFile(_ path: String) throws(SwiftletError) -> (Digest, Int64) {
        let file = try OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY | O_CLOEXEC, what: "the pack")
        let size = try file.size()
        var hasher = SHA256()
        try file.forEachPiece(upTo: size, what: path) { piece, _ in hasher.update(piece) }
        return (Digest(bytes: hasher.finalize()), Int64(size))
    }

    static func pull(_ reference: String, insecure: Bool, credentials: (user: String, password: String)?) async throws(SwiftletError) -> Digest {
        let parsed = try ImageReference(parsing: reference)
        let store = try ImageStore()
        let source = RegistrySource(reference: parsed, insecure: insecure, credentials: credentials)
        let puller = ImagePuller(progress: report)
        return try await puller.pull(from: source, into: store).manifest
    }
}
