import Glibc
import ImageRegistry
import Images
import SwiftletSystem

// swiftlet-pull: pulls one image from a registry into the image store ($SWIFTLET_HOME) and prints
// its manifest digest. `swiftlet` runs it for registry references so that the network client
// (HTTP, TLS) lives in a short-lived process of its own, not in the VMM's.
//
//   swiftlet-pull [--insecure-registry] REFERENCE
//
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
        var reference: String?
        for argument in CommandLine.arguments.dropFirst() {
            switch argument {
            case "--insecure-registry": insecure = true
            case _ where argument.hasPrefix("-"): fail("swiftlet-pull: unknown option \(argument)")
            default: reference = argument
            }
        }
        guard let reference else { fail("usage: swiftlet-pull [--insecure-registry] REFERENCE") }
        var credentials: (user: String, password: String)?
        if let user = getenv("SWIFTLET_REGISTRY_USER").map({ String(cString: $0) }), !user.isEmpty {
            credentials = (user, getenv("SWIFTLET_REGISTRY_PASSWORD").map { String(cString: $0) } ?? "")
        }
        do {
            // Confined before any byte from a registry arrives: its own seccomp list (files,
            // sockets, no processes), no new privileges, a descriptor bound.
            try Confinement.confine(.pull)
            print(try await pull(reference, insecure: insecure, credentials: credentials))
        } catch {
            fail(error.description)
        }
    }

    static func pull(_ reference: String, insecure: Bool, credentials: (user: String, password: String)?) async throws(SwiftletError) -> Digest {
        let parsed = try ImageReference(parsing: reference)
        let store = try ImageStore()
        let source = RegistrySource(reference: parsed, insecure: insecure, credentials: credentials)
        let puller = ImagePuller(progress: report)
        return try await puller.pull(from: source, into: store).manifest
    }
}
