import Glibc
import ImageRegistry
import Images
import SwiftletSystem
import Testing
import TestSupport

/// The registry client against a real registry (Debian's docker-registry on loopback), with
/// images pushed by skopeo from the test images.
@Suite(.enabled(if: TestImages.directory != nil && access("/usr/bin/docker-registry", X_OK) == 0 && access("/usr/bin/skopeo", X_OK) == 0,
                "needs docker-registry, skopeo and the test images (scripts/setup installs them)"))
struct RegistryTests {
    let home = TemporaryDirectory()

    func store() throws(SwiftletError) -> ImageStore { try ImageStore(root: home.path + "/store") }

    func pull(_ reference: String, credentials: (user: String, password: String)? = nil) async throws(SwiftletError) -> StoredImage {
        let source = RegistrySource(reference: try ImageReference(parsing: reference), credentials: credentials)
        return try await ImagePuller().pull(from: source, into: try store())
    }

    @Test func pullsByTagAndByDigestAndChoosesThePlatform() async throws {
        let registry = try #require(LocalRegistry())
        let pushed = registry.push("oci:\(TestImages.path("layout")):latest", as: "test/busybox:1")
        try #require(pushed.status == 0, "\(pushed.stderr)")
        let multi = registry.push("oci:\(TestImages.path("multiarch")):latest", as: "test/multi:latest", all: true)
        try #require(multi.status == 0, "\(multi.stderr)")

        let byTag = try await pull("\(registry.host)/test/busybox:1")
        #expect(byTag.name == "\(registry.host)/test/busybox:1")
        #expect(byTag.layers.count == 2)
        let byDigest = try await pull("\(registry.host)/test/busybox@\(byTag.manifest)")
        #expect(byDigest.manifest == byTag.manifest)
        // The index holds arm64 first; the amd64 image is chosen, and it is the same image.
        let chosen = try await pull("\(registry.host)/test/multi")
        #expect(chosen.manifest == byTag.manifest)
        #expect(try store().images().count == 3)
    }

    @Test func registryErrorsAreClear() async throws {
        let registry = try #require(LocalRegistry())
        try #require(registry.push("oci:\(TestImages.path("arm64")):latest", as: "test/arm:latest", all: true).status == 0)
        await #expect { try await pull("\(registry.host)/test/nothing:here") } throws: {
            let e = $0 as! SwiftletError
            return e.code == .notFound && e.message.contains("not found in the registry")
        }
        await #expect { try await pull("\(registry.host)/test/arm") } throws: {
            ($0 as! SwiftletError).message.contains("has no linux/amd64 image (it has linux/arm64)")
        }
        let nobody = LocalRegistry.freePort()
        await #expect { try await pull("127.0.0.1:\(nobody)/test/busybox") } throws: {
            ($0 as! SwiftletError).message.contains("cannot reach the registry 127.0.0.1:\(nobody)")
        }
        await #expect { try await pull("\(registry.host)/test/arm@sha256:" + String(repeating: "0", count: 64)) } throws: {
            ($0 as! SwiftletError).code == .notFound
        }
        #expect(try store().images().isEmpty)
    }

    @Test func basicAuthNeedsCredentials() async throws {
        let registry = try #require(LocalRegistry(authenticated: true))
        let pushed = registry.push("oci:\(TestImages.path("layout")):latest", as: "private/busybox:latest")
        try #require(pushed.status == 0, "\(pushed.stderr)")
        await #expect { try await pull("\(registry.host)/private/busybox") } throws: {
            ($0 as! SwiftletError).message.contains("requires a user name and password")
        }
        await #expect { try await pull("\(registry.host)/private/busybox", credentials: ("swiftlet", "wrong")) } throws: {
            ($0 as! SwiftletError).code == .permissionDenied
        }
        let image = try await pull("\(registry.host)/private/busybox", credentials: (LocalRegistry.user, LocalRegistry.password))
        #expect(image.layers.count == 2)
    }

    @Test func bearerTokensAreFetchedFromTheChallengesRealm() async throws {
        let registry = try #require(LocalRegistry())
        try #require(registry.push("oci:\(TestImages.path("layout")):latest", as: "tokens/busybox:latest").status == 0)
        let proxy = try #require(TokenProxy(registryPort: registry.port))
        let image = try await pull("\(proxy.host)/tokens/busybox")
        #expect(image.layers.count == 2)
        #expect(image.name == "\(proxy.host)/tokens/busybox:latest")
    }
}
