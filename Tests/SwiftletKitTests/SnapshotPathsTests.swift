import Glibc
import Images
@testable import SwiftletKit
import SwiftletSystem
import Testing
import TestSupport
import VMM

/// A snapshot (or the machine record it carries) names disks and a kernel by path; Swiftlet opens
/// an image layer only by its digest in this user's image store, the default image and kernel at
/// their asset paths, and nothing else. What Swiftlet keeps is private to the user.
@Suite struct SnapshotPathsTests {
    let home = TemporaryDirectory()
    let hex = String(repeating: "ab", count: 32)

    private func mode(_ path: String) -> mode_t {
        var info = stat()
        return lstat(path, &info) == 0 ? info.st_mode & 0o7777 : 0
    }

    @Test func anImageLayerIsFoundByItsDigestInTheStore() throws {
        let store = try ImageStore(root: home.path + "/store")
        let local = store.diskPath(diffID: try Digest(parsing: "sha256:" + hex))
        // Not pulled here: said so, and nothing is opened.
        let missing = #expect(throws: SwiftletError.self) {
            try SnapshotPaths.layerDisk("/home/someone/.local/share/swiftlet/disks/sha256/\(hex).erofs", storeRoot: store.root)
        }
        #expect(missing?.message.contains("the image layer sha256:\(hex) that the snapshot was taken with is not in the image store") == true)
        _ = home.write("store/disks/sha256/\(hex).erofs", [1, 2, 3])
        // Wherever the snapshot was made, the layer is this store's file of that digest.
        for recorded in ["/home/someone/.local/share/swiftlet/disks/sha256/\(hex).erofs", "/etc/disks/sha256/\(hex).erofs", local] {
            #expect(try SnapshotPaths.layerDisk(recorded, storeRoot: store.root) == local)
        }
    }

    @Test func otherHostFilesAreRefused() throws {
        let storeRoot = home.path + "/store"
        let outside = home.write("secret", [1, 2, 3])
        let refused = [
            outside, "/dev/sda", "/etc/passwd", "../../x", "disk-0",
            storeRoot + "/disks/sha256/../../../secret", storeRoot + "/blobs/sha256/\(hex)",
            storeRoot + "/disks/sha256/\(hex).erofs/../../../../secret", storeRoot + "/disks/sha256/ABC.erofs",
            "/x/images/default/../../../etc/passwd",
        ]
        for path in refused {
            let error = #expect(throws: SwiftletError.self) { try SnapshotPaths.layerDisk(path, storeRoot: storeRoot) }
            #expect(error?.message.contains("which is neither an image layer in the image store nor Swiftlet's default image") == true,
                    "\(path): \(String(describing: error))")
        }
        #expect(try SnapshotPaths.layerDisk("/elsewhere/.cache/swiftlet/images/default/rootfs.erofs", storeRoot: storeRoot) == GuestAssets.defaultImage)
        // The resolver a restore gets: a machine's own record's layers are its own.
        let record = MachineRecord(name: "m", source: "--rootfs", layers: [outside], defaults: .plain, cpus: 1, memoryMiB: 64,
                                   kernel: nil, diskMiB: 64, created: 0)
        #expect(throws: SwiftletError.self) { try SnapshotPaths.resolver.resolve(outside) }
        #expect(try SnapshotPaths.resolver(trusting: record).resolve(outside) == outside)
    }

    @Test func aSnapshotsMachineRecordCannotNameAKernelOrLayersOutsideTheStore() throws {
        var record = MachineRecord(name: "m", source: "x", layers: [GuestAssets.defaultImage], defaults: .plain, cpus: 1, memoryMiB: 64,
                                   kernel: nil, diskMiB: 64, created: 0)
        #expect(try SnapshotPaths.checked(record) == record)
        record.kernel = GuestAssets.defaultKernel()
        #expect(try SnapshotPaths.checked(record) == record)
        record.kernel = "/etc/shadow"
        let kernel = #expect(throws: SwiftletError.self) { try SnapshotPaths.checked(record) }
        #expect(kernel?.message.contains("the machine in the snapshot was made with the kernel /etc/shadow") == true)
        record.kernel = nil
        record.layers = [GuestAssets.defaultImage, "/home/someone/.ssh/id_ed25519"]
        let layer = #expect(throws: SwiftletError.self) { try SnapshotPaths.checked(record) }
        #expect(layer?.message.contains("names the disk /home/someone/.ssh/id_ed25519") == true)
    }

    @Test func theImageStoreAndAChildsOutputFilesArePrivate() throws {
        let root = home.path + "/new-home"
        _ = try ImageStore(root: root)
        for directory in ["", "/blobs", "/blobs/sha256", "/disks", "/disks/sha256", "/tmp"] {
            #expect(mode(root + directory) == 0o700, "\(directory)")
        }
        #expect(mode(root + "/lock") == 0o600)
        // A background run's output (`run -d`) and a VMM process's log.
        let output = home.path + "/stdout", error = home.path + "/stderr"
        let pid = try spawnChild("/bin/sh", arguments: ["sh", "-c", "echo out; echo err >&2"], output: .file(output), error: .file(error), what: "a test child")
        var status: Int32 = 0
        #expect(waitpid(pid, &status, 0) == pid)
        #expect(try OwnedFileDescriptor.readSmallTextFile(output) == "out\n")
        #expect(mode(output) == 0o600 && mode(error) == 0o600)
        // A planted link where the output goes is not written through.
        let victim = home.write("victim", Array("kept".utf8))
        #expect(symlink(victim, home.path + "/planted") == 0)
        if let linked = try? spawnChild("/bin/sh", arguments: ["sh", "-c", "echo out"], output: .file(home.path + "/planted"), error: .null, what: "a test child") {
            #expect(waitpid(linked, &status, 0) == linked)
        }
        #expect(try OwnedFileDescriptor.readSmallTextFile(victim) == "kept")
    }
}
