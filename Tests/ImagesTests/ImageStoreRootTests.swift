import Glibc
import Images
import SwiftletSystem
import Testing
import TestSupport

/// Where the store lives: a fresh home has no ~/.local/share, and the store makes what is missing.
@Suite struct ImageStoreRootTests {
    let home = TemporaryDirectory()

    @Test func aStoreWhoseParentsDoNotExistIsCreated() throws {
        let root = home.path + "/fresh-home/.local/share/swiftlet"
        #expect(access(home.path + "/fresh-home", F_OK) != 0)
        let store = try ImageStore(root: root)
        #expect(try store.images().isEmpty)
        for path in ["", "/blobs/sha256", "/disks/sha256", "/tmp", "/lock"] {
            #expect(access(root + path, F_OK) == 0, "\(root + path) exists")
        }
        // Opening it again finds what is there.
        #expect(try ImageStore(root: root).root == root)
    }

    @Test func aFileWhereTheStoreGoesIsNamed() throws {
        let file = home.write("not-a-directory", [1])
        #expect { try ImageStore(root: file + "/.local/share/swiftlet") } throws: {
            ($0 as! SwiftletError).message == "cannot create \(file)/.local/share/swiftlet: \(file) exists and is not a directory"
        }
    }
}
