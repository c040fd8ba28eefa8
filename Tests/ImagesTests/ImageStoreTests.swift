import Glibc
import Images
import SwiftletSystem
import Testing
import TestSupport

/// The store and the local image sources, on the images scripts/build-test-images makes.
@Suite(.enabled(if: TestImages.directory != nil, "scripts/build-test-images could not build the test images (umoci, skopeo)"))
struct ImageStoreTests {
    let home = TemporaryDirectory()
    let scratch = TemporaryDirectory()

    func store() throws -> ImageStore { try ImageStore(root: home.path + "/store") }

    func pull(_ source: some ImageSource, into store: ImageStore) async throws(SwiftletError) -> StoredImage {
        try await ImagePuller().pull(from: source, into: store)
    }

    func files(_ sub: String) -> [String] {
        let r = Subprocess.run(["/bin/sh", "-c", "cd \"$0\" && ls -A", home.path + "/store/" + sub])
        return r.stdout.split(separator: "\n").map(String.init).sorted()
    }

    func sh(_ line: String) -> Subprocess { Subprocess.run(["/bin/sh", "-c", line], environment: ["D": scratch.path, "T": TestImages.directory ?? ""]) }

    @Test func layoutArchivesAndIndexesGiveTheSameImage() async throws {
        let store = try store()
        let layout = try await pull(OCILayoutSource(directory: TestImages.path("layout")), into: store)
        #expect(layout.layers.count == 2 && layout.diffIDs.count == 2 && layout.platform == "linux/amd64")
        for digest in [layout.manifest, layout.config] + layout.layers { #expect(store.hasBlob(digest)) }
        for diffID in layout.diffIDs { #expect(store.hasDisk(diffID: diffID)) }

        // The same image as an OCI archive, and chosen for amd64 from an index: same manifest.
        let archive = try TestImages.path("oci-archive.tar").withFile { fd throws(SwiftletError) in
            try ArchiveSource(reading: fd, displayName: "oci-archive.tar", into: store)
        }
        #expect(try await pull(archive, into: store).manifest == layout.manifest)
        #expect(try await pull(OCILayoutSource(directory: TestImages.path("multiarch")), into: store).manifest == layout.manifest)

        // docker save's format and zstd layers: other manifests, the same layer contents, so no new disks.
        let saved = try TestImages.path("docker-save.tar").withFile { fd throws(SwiftletError) in
            try ArchiveSource(reading: fd, displayName: "docker-save.tar", into: store)
        }
        let docker = try await pull(saved, into: store)
        #expect(docker.name == "docker.io/test/busybox:latest")
        #expect(docker.diffIDs == layout.diffIDs)
        let zstd = try await pull(OCILayoutSource(directory: TestImages.path("zstd")), into: store)
        #expect(zstd.diffIDs == layout.diffIDs && zstd.layers != layout.layers)
        #expect(files("disks/sha256").count == 2, "one disk per diff ID")
        #expect(files("tmp").isEmpty)
        #expect(try store.images().count == 3, "the layout (also from the archive and index), docker-save, zstd")
    }

    /// `image pull DIR:py` of a layout skopeo wrote as `oci:DIR:py` names the image, and the name
    /// finds it again (as `run --image localhost/py` looks it up).
    @Test func aLayoutPulledByTagIsNamedAndFoundByTheName() async throws {
        #expect(sh(#"cp -r "$T/layout" "$D/l" && chmod -R u+w "$D/l" && sed -i 's/"org.opencontainers.image.ref.name":"latest"/"org.opencontainers.image.ref.name":"py"/' "$D/l/index.json" && grep -q '"py"' "$D/l/index.json""#).status == 0)
        let store = try store()
        let image = try await pull(OCILayoutSource(directory: scratch.path + "/l", tag: "py"), into: store)
        #expect(image.name == "localhost/py:latest")
        for name in ["localhost/py", "localhost/py:latest"] { #expect(try store.find(name)?.manifest == image.manifest) }
        #expect(try store.find("py") == nil, "a short name is Docker Hub's, as for any pull")
        let unnamed = try await pull(OCILayoutSource(directory: scratch.path + "/l"), into: store)
        #expect(unnamed.name == nil, "without the tag, the bare ref name is not taken for a name")
    }

    @Test func removeKeepsWhatOtherImagesShareAndPruneTheRest() async throws {
        let store = try store()
        let gzip = try await pull(OCILayoutSource(directory: TestImages.path("layout")), into: store)
        let zstd = try await pull(OCILayoutSource(directory: TestImages.path("zstd")), into: store)
        try store.remove(gzip.manifest.hex)
        for digest in gzip.layers { #expect(!store.hasBlob(digest)) }
        for diffID in zstd.diffIDs { #expect(store.hasDisk(diffID: diffID), "the zstd image still uses the disks") }
        #expect(try store.find(zstd.manifest.short)?.manifest == zstd.manifest)
        #expect(throws: SwiftletError.self) { try store.remove("no-such-image") }
        // A leftover from an interrupted pull, then prune: only the unnamed image and it go.
        _ = home.write("store/tmp/blob.abcdef", [1, 2, 3])
        try store.prune(unnamedImages: true)
        #expect(files("blobs/sha256").isEmpty && files("disks/sha256").isEmpty && files("tmp").isEmpty)
        #expect(try store.images().isEmpty)
    }

    /// Disks a machine still boots from outlive their image: `remove` and `prune` keep the ones
    /// named in `keepingDisks`, however their path is spelled, and a later prune without them deletes them.
    @Test func disksInUseOutsideTheStoreAreKeptUntilReleased() async throws {
        let store = try store()
        let image = try await pull(OCILayoutSource(directory: TestImages.path("layout")), into: store)
        let disks = image.diffIDs.map { store.diskPath(diffID: $0) }
        #expect(disks.count == 2)
        let link = scratch.path + "/store-link"
        #expect(symlink(home.path + "/store", link) == 0)
        // The first disk by its own path, the second through a symbolic link and a doubled slash.
        let spelled = [disks[0], link + "/disks//sha256/" + image.diffIDs[1].hex + ".erofs"]
        try store.remove(image.manifest.hex, keepingDisks: Set(spelled + ["/not/in/the/store.erofs"]))
        #expect(try store.images().isEmpty)
        for digest in image.layers + [image.manifest, image.config] { #expect(!store.hasBlob(digest)) }
        for diffID in image.diffIDs { #expect(store.hasDisk(diffID: diffID), "kept for the machine") }
        try store.prune(keepingDisks: [disks[1]])
        #expect(!store.hasDisk(diffID: image.diffIDs[0]) && store.hasDisk(diffID: image.diffIDs[1]))
        try store.prune()
        #expect(files("disks/sha256").isEmpty)
    }

    @Test func aCorruptBlobIsRejectedAndNothingIsRecorded() async throws {
        #expect(sh(#"cp -r "$T/layout" "$D/l" && chmod -R u+w "$D/l" && for b in "$D"/l/blobs/sha256/*; do "#
                   + #"if [ $(stat -c %s "$b") -gt 100000 ]; then printf 'XXXX' | dd of="$b" bs=1 seek=50000 conv=notrunc 2>/dev/null; fi; done"#).status == 0)
        let store = try store()
        await #expect { try await pull(OCILayoutSource(directory: scratch.path + "/l"), into: store) } throws: {
            ($0 as! SwiftletError).message.contains("does not match its digest")
        }
        #expect(try store.images().isEmpty)
        #expect(files("tmp").isEmpty && files("disks/sha256").isEmpty)
    }

    @Test func truncatedArchivesAndWrongArchitecturesAreErrors() async throws {
        #expect(sh(#"head -c 600000 "$T/docker-save.tar" > "$D/short.tar""#).status == 0)
        let store = try store()
        #expect { try (scratch.path + "/short.tar").withFile { fd throws(SwiftletError) in
            try ArchiveSource(reading: fd, displayName: "short.tar", into: store) } } throws: {
            ($0 as! SwiftletError).message.contains("truncated")
        }
        await #expect { try await pull(OCILayoutSource(directory: TestImages.path("arm64")), into: store) } throws: {
            ($0 as! SwiftletError).message.contains("has no linux/amd64 image (it has linux/arm64)")
        }
        #expect(try store.images().isEmpty)
        #expect(throws: SwiftletError.self) { try OCILayoutSource(directory: scratch.path) }
        #expect(files("tmp").isEmpty)
    }

    @Test func unsupportedMediaTypesAreNamed() async throws {
        // Rewrite the layout's manifest with a layer type Swiftlet does not know, re-addressed.
        #expect(sh(#"""
            cp -r "$T/layout" "$D/l" && chmod -R u+w "$D/l" && cd "$D/l" &&
            m=$(sed 's/.*"digest":"sha256:\([0-9a-f]*\)".*/\1/' index.json) &&
            sed 's/application\/vnd.oci.image.layer.v1.tar+gzip/application\/vnd.example.strange/' blobs/sha256/$m > new &&
            n=$(sha256sum new | cut -c1-64) && mv new blobs/sha256/$n &&
            sed -i "s/$m/$n/; s/\"size\":[0-9]*/\"size\":$(stat -c %s blobs/sha256/$n)/" index.json
            """#).status == 0)
        let store = try store()
        await #expect { try await pull(OCILayoutSource(directory: scratch.path + "/l"), into: store) } throws: {
            ($0 as! SwiftletError).message.contains("unsupported layer type application/vnd.example.strange")
        }
    }

    @Test func aLayerMustUnpackToItsDiffID() async throws {
        let store = try store()
        let image = try await pull(OCILayoutSource(directory: TestImages.path("layout")), into: store)
        let wrong = Digest.of([1, 2, 3])
        #expect { try store.layerDisk(layer: image.layers[0], diffID: wrong) } throws: {
            ($0 as! SwiftletError).message.contains("does not unpack to its diff ID")
        }
        #expect(!store.hasDisk(diffID: wrong))
    }
}

extension String {
    /// Opens the file and passes its descriptor to `body`.
    func withFile<T>(_ body: (Int32) throws(SwiftletError) -> T) throws(SwiftletError) -> T {
        let file = try OwnedFileDescriptor.openInput(self, role: "test file")
        return try body(file.rawValue)
    }
}
