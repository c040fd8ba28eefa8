import Glibc
@testable import Images
import SwiftletSystem
import Testing
import TestSupport

/// The names images from OCI layouts and `docker save` archives are recorded under.
@Suite struct LocalImageNameTests {
    let scratch = TemporaryDirectory()

    /// An OCI layout whose index has one entry per annotation set (no blobs: naming reads only the index).
    func layout(_ entries: [[String: String]]) -> String {
        let manifests = entries.enumerated().map { number, annotations in
            let digest = Digest.of([UInt8(number)])
            let pairs = annotations.map { "\"\($0.key)\": \"\($0.value)\"" }.joined(separator: ", ")
            return #"{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "\#(digest)", "size": 10, "annotations": {\#(pairs)}}"#
        }
        scratch.write("oci-layout", Array(#"{"imageLayoutVersion": "1.0.0"}"#.utf8))
        scratch.write("index.json", Array(#"{"schemaVersion": 2, "manifests": [\#(manifests.joined(separator: ", "))]}"#.utf8))
        return scratch.path
    }

    func name(_ entries: [[String: String]], tag: String? = nil) throws -> String? {
        try OCILayoutSource(directory: layout(entries), tag: tag).imageName
    }

    static let ref = LocalImageName.refNameKey

    @Test func aTagThePullNamesIsALocalhostName() throws {
        #expect(try name([[Self.ref: "py"]], tag: "py") == "localhost/py:latest")
        #expect(try name([[Self.ref: "latest"]], tag: "latest") == "localhost/latest:latest")
        // Two images in the layout: the tag picks one and names it.
        #expect(try name([[Self.ref: "py"], [Self.ref: "go"]], tag: "go") == "localhost/go:latest")
    }

    @Test func aBareRefNameWithoutTheTagNamesNothing() throws {
        #expect(try name([[Self.ref: "latest"]]) == nil, "skopeo's oci:DIR:latest: a tag, not a name")
        #expect(try name([[Self.ref: "py"]]) == nil)
        #expect(try name([[:]]) == nil, "no ref name at all")
    }

    @Test func refNamesThatAreReferencesNameTheImage() throws {
        #expect(try name([[Self.ref: "example.com/team/app:1.0"]]) == "example.com/team/app:1.0")
        #expect(try name([[Self.ref: "example.com/team/app:1.0"]], tag: "1.0") == "example.com/team/app:1.0")
        #expect(try name([[Self.ref: "app:2"]]) == "localhost/app:2", "no registry written: localhost, not Docker Hub")
        #expect(try name([[Self.ref: "team/app"]]) == "localhost/team/app:latest")
        #expect(try name([[Self.ref: "localhost:5000/app:3"]]) == "localhost:5000/app:3")
    }

    @Test func containerdsNameWinsAndIsQualifiedAsDockerDoes() throws {
        #expect(try name([[Self.ref: "latest", LocalImageName.containerdNameKey: "busybox:1.36"]]) == "docker.io/library/busybox:1.36")
    }

    @Test func ambiguousOrInvalidNamesLeaveTheImageUnnamed() throws {
        #expect(try name([[Self.ref: "a:1"], [Self.ref: "b:1"]]) == nil, "two images, two names")
        #expect(try name([[Self.ref: "Py"]], tag: "Py") == nil, "repository names are lowercase")
        #expect(try name([[Self.ref: "app:bad tag"]]) == nil)
    }

    @Test func aTagTheLayoutLacksIsAnError() throws {
        #expect { try name([[Self.ref: "py"]], tag: "go") } throws: {
            let error = $0 as! SwiftletError
            return error.code == .notFound && error.message == "\(scratch.path):go: no image tagged \"go\""
        }
    }

    @Test func dockerSaveNamesTheRepoTagPicked() throws {
        let files: [String: (digest: Digest, size: Int64)] = ["c.json": (Digest.of([1]), Int64(1)), "l.tar": (Digest.of([2]), Int64(1))]
        let manifest = Array(#"[{"Config": "c.json", "RepoTags": ["test/app:1", "test/app:2"], "Layers": ["l.tar"]}]"#.utf8)
        #expect(try ArchiveSource.manifest(fromDockerSave: manifest, files: files, tag: "2", archive: "a.tar").1 == "docker.io/test/app:2")
        #expect(try ArchiveSource.manifest(fromDockerSave: manifest, files: files, tag: nil, archive: "a.tar").1 == "docker.io/test/app:1")
        let untagged = Array(#"[{"Config": "c.json", "Layers": ["l.tar"]}]"#.utf8)
        #expect(try ArchiveSource.manifest(fromDockerSave: untagged, files: files, tag: nil, archive: "a.tar").1 == nil)
    }
}
