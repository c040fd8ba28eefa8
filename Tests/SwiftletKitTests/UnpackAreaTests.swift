import Glibc
@testable import SwiftletKit
import SwiftletSystem
import Testing
import TestSupport

/// `$SWIFTLET_HOME/unpacked`: an entry whose process is gone (its lock file can be locked) is
/// removed by the next reservation; one in use, or young and without a lock, is not.
@Suite struct UnpackAreaTests {
    let dir = TemporaryDirectory()

    func exists(_ name: String) -> Bool { access(dir.path + "/" + name, F_OK) == 0 }

    @Test func abandonedEntriesGoAndEntriesInUseStay() throws {
        let root = dir.path
        let inUse = try UnpackArea.reserve(in: root)
        try FileTree.makeDirectory(inUse.path)
        let inUseName = String(inUse.path.split(separator: "/").last!)
        // A process that died: its entry and an unlocked lock file.
        try FileTree.makeDirectory(root + "/dead")
        _ = dir.write("dead/memory", [1, 2, 3])
        _ = dir.write("dead.lock", [])
        // A lock file whose entry is already gone.
        _ = dir.write("orphan.lock", [])
        // Entries without a lock file: one from yesterday, one from now.
        try FileTree.makeDirectory(root + "/old")
        var times = [timespec(tv_sec: time(nil) - 2 * 86_400, tv_nsec: 0), timespec(tv_sec: time(nil) - 2 * 86_400, tv_nsec: 0)]
        #expect(utimensat(AT_FDCWD, root + "/old", &times, 0) == 0)
        try FileTree.makeDirectory(root + "/young")

        let next = try UnpackArea.reserve(in: root)
        #expect(!exists("dead") && !exists("dead.lock") && !exists("orphan.lock") && !exists("old"))
        #expect(exists(inUseName) && exists(inUseName + ".lock") && exists("young"))
        #expect(access(next.path + ".lock", F_OK) == 0)

        // Released by its process (the lock closed, as when it dies): the next sweep takes it.
        _ = consume inUse
        UnpackArea.sweep(root)
        #expect(!exists(inUseName) && !exists(inUseName + ".lock"))
        #expect(access(next.path + ".lock", F_OK) == 0, "a reservation in use stays")
        UnpackArea.release(next.path)
        #expect(access(next.path + ".lock", F_OK) != 0)
    }

    /// In a shared temporary directory: only the prefix's names, and never through a link.
    @Test func aSharedDirectoryIsSweptOnlyForItsPrefixAndNeverThroughALink() throws {
        let root = dir.path
        try FileTree.makeDirectory(root + "/victim")
        _ = dir.write("victim/keep", [1])
        #expect(symlink(root + "/victim", root + "/swiftlet-pack-link") == 0)
        _ = dir.write("swiftlet-pack-link.lock", [])
        try FileTree.makeDirectory(root + "/other")
        _ = dir.write("other.lock", [])
        try FileTree.makeDirectory(root + "/swiftlet-pack-dead")
        _ = dir.write("swiftlet-pack-dead.lock", [])
        let reservation = try UnpackArea.reserve(prefix: "swiftlet-pack-", in: root, shared: true)
        #expect(exists("victim/keep"), "a link's target is never swept")
        #expect(exists("other") && exists("other.lock"), "names without the prefix are not this sweep's")
        #expect(!exists("swiftlet-pack-dead") && !exists("swiftlet-pack-dead.lock"))
        UnpackArea.release(reservation.path)
    }
}
