import Glibc
import ImageRegistry
import Images
import SwiftletSystem
import Testing
import TestSupport

/// Packs through a real registry (Debian's docker-registry on loopback) as OCI artifacts: pushed
/// and pulled back byte for byte, by tag and by digest, with basic auth; an image is not taken
/// for a pack, and a blob the registry serves damaged never becomes the output file.
@Suite(.enabled(if: access("/usr/bin/docker-registry", X_OK) == 0, "needs docker-registry (scripts/setup installs it)"))
struct PackArtifactTests {
    let dir = TemporaryDirectory()

    /// A file of `count` bytes that do not repeat (more than one 1 MiB upload chunk by default).
    func packFile(_ name: String = "app.swiftlet", count: Int = 3 << 20 + 4321) throws -> (path: String, digest: Digest, size: Int64) {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        let bytes = (0..<count).map { _ -> UInt8 in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
        return (dir.write(name, bytes), Digest.of(bytes), Int64(count))
    }

    func source(_ reference: String, credentials: (user: String, password: String)? = nil) throws -> RegistrySource {
        RegistrySource(reference: try ImageReference(parsing: reference), credentials: credentials)
    }

    func leftovers() -> [String] {
        (OwnedFileDescriptor.directoryEntries(dir.path) ?? []).map(\.name).filter { $0.hasPrefix(".") }
    }

    @Test func aPackGoesUpAsAnArtifactAndComesBackByTagAndDigest() async throws {
        let registry = try #require(LocalRegistry())
        let pack = try packFile()
        let reference = "\(registry.host)/packs/app:v1"
        let pushed = try await source(reference).pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in })
        let manifest = try OwnedFileDescriptor.readSmallTextFile(registry.directory.path + "/data/docker/registry/v2/blobs/sha256/"
                                                                 + String(pushed.hex.prefix(2)) + "/" + pushed.hex + "/data")
        #expect(manifest.contains("\"artifactType\":\"application/vnd.swiftlet.pack.v1\"") && manifest.contains("\"org.opencontainers.image.title\":\"app.swiftlet\""),
                "\(manifest)")
        let byTag = dir.path + "/by-tag.swiftlet"
        #expect(try await source(reference).pullPack(to: byTag, progress: { _ in }) == pushed)
        #expect(Digest.of(try OwnedFileDescriptor.readSmallFile(byTag, limit: 8 << 20)) == pack.digest)
        let byDigest = dir.path + "/by-digest.swiftlet"
        _ = try await source("\(registry.host)/packs/app@\(pushed)").pullPack(to: byDigest, progress: { _ in })
        #expect(Digest.of(try OwnedFileDescriptor.readSmallFile(byDigest, limit: 8 << 20)) == pack.digest)
        // Pushed again under another tag: the blob is there already, and the manifest is the same.
        #expect(try await source("\(registry.host)/packs/app:v2").pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in }) == pushed)
        await #expect { try await source("\(registry.host)/packs/app@\(pushed)").pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in }) } throws: {
            ($0 as! SwiftletError).message.contains("a pack is pushed to a tag, not a digest")
        }
        #expect(leftovers().isEmpty)
    }

    @Test(.enabled(if: TestImages.directory != nil && access("/usr/bin/skopeo", X_OK) == 0, "needs skopeo and the test images"))
    func anImageIsNotTakenForAPack() async throws {
        let registry = try #require(LocalRegistry())
        try #require(registry.push("oci:\(TestImages.path("layout")):latest", as: "test/busybox:1").status == 0)
        let output = dir.path + "/image.swiftlet"
        await #expect { try await source("\(registry.host)/test/busybox:1").pullPack(to: output, progress: { _ in }) } throws: {
            let message = ($0 as! SwiftletError).message
            return message.contains("is not a Swiftlet pack (its manifest is of application/vnd.oci.image.config.v1+json, with 2 layers)")
        }
        #expect(access(output, F_OK) != 0 && leftovers().isEmpty)
    }

    @Test func aPackTheRegistryServesDamagedNeverBecomesTheFile() async throws {
        let registry = try #require(LocalRegistry())
        let pack = try packFile(count: 100_000)
        let reference = "\(registry.host)/packs/damaged:v1"
        _ = try await source(reference).pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in })
        let blob = registry.directory.path + "/data/docker/registry/v2/blobs/sha256/" + String(pack.digest.hex.prefix(2)) + "/" + pack.digest.hex + "/data"
        var bytes = try OwnedFileDescriptor.readSmallFile(blob, limit: 1 << 20)
        bytes[50_000] ^= 0xFF
        _ = dir.write("flipped", bytes)
        try #require(rename(dir.path + "/flipped", blob) == 0)
        let output = dir.path + "/out.swiftlet"
        _ = dir.write("out.swiftlet", Array("what was there".utf8))
        await #expect { try await source(reference).pullPack(to: output, progress: { _ in }) } throws: {
            ($0 as! SwiftletError).message.contains("arrived damaged (100000 of 100000 bytes")
        }
        #expect(try OwnedFileDescriptor.readSmallTextFile(output) == "what was there", "a failed pull leaves the file as it was")
        #expect(leftovers().isEmpty, "and no partial file beside it")
    }

    @Test func anAuthenticatedRegistryTakesAndGivesPacksOnlyWithCredentials() async throws {
        let registry = try #require(LocalRegistry(authenticated: true))
        let pack = try packFile(count: 10_000)
        let reference = "\(registry.host)/private/app:v1"
        await #expect { try await source(reference).pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in }) } throws: {
            ($0 as! SwiftletError).message.contains("requires a user name and password")
        }
        await #expect { try await source(reference, credentials: ("swiftlet", "wrong")).pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in }) } throws: {
            ($0 as! SwiftletError).code == .permissionDenied
        }
        let credentials = (LocalRegistry.user, LocalRegistry.password)
        _ = try await source(reference, credentials: credentials).pushPack(pack.path, digest: pack.digest, size: pack.size, progress: { _ in })
        let output = dir.path + "/pulled.swiftlet"
        await #expect { try await source(reference).pullPack(to: output, progress: { _ in }) } throws: {
            ($0 as! SwiftletError).message.contains("requires a user name and password")
        }
        _ = try await source(reference, credentials: credentials).pullPack(to: output, progress: { _ in })
        #expect(Digest.of(try OwnedFileDescriptor.readSmallFile(output)) == pack.digest)
    }
}
