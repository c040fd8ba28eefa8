import Foundation
import Glibc
import SwiftletSystem
import Testing
@testable import Devices

/// The file server's tables saved as names and taken back by a new server (a snapshot's restore),
/// and saved tables that lie.
@Suite struct FuseServerStateTests {
    typealias Tree = FuseServerTests.Tree
    typealias Client = FuseServerTests.Client

    /// `saved` through JSON and back: the state is a plain value.
    static func roundTrip(_ saved: FileServerState) throws -> FileServerState {
        try JSONDecoder().decode(FileServerState.self, from: try JSONEncoder().encode(saved))
    }

    static func getattr(_ c: inout Client, _ node: UInt64) -> Client.Reply {
        c.call(.getattr, node, Client.u32(0) + Client.u32(0) + Client.u64(0))
    }

    @Test func nodesAndOpenFilesComeBackByNameInANewServer() throws {
        let tree = try Tree()
        let volumes = [SharedVolume(path: tree.shared, readOnly: false)]
        var c = try FuseServerTests().client(volumes)
        let volume = UInt64(c.lookup(1, "v0"))
        let dir = UInt64(c.lookup(volume, "dir"))
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        let reading = UInt64(c.open(hello, flags: O_RDONLY))
        let (created, writing) = c.create(volume, "log.txt", flags: O_RDWR | O_TRUNC)
        #expect(created > 0 && c.write(writing, Array("abc".utf8)).error == 0)
        var opened = c.call(.opendir, dir, Client.u32(0) + Client.u32(0)).reader
        let listing = opened.u64()
        var root = c.call(.opendir, 1, Client.u32(0) + Client.u32(0)).reader
        let rootListing = root.u64()
        // The host renames a file the guest holds: the save finds it where it is now.
        #expect(rename(tree.shared + "/hello.txt", tree.shared + "/dir/moved.txt") == 0)

        let saved = try Self.roundTrip(c.server.saveState())
        #expect(saved.nodes.count == 4 && saved.handles.count == 4)
        #expect(saved.nodes.first { $0.id == hello }?.names == [Array("dir".utf8), Array("moved.txt".utf8)])
        #expect(!String(decoding: try JSONEncoder().encode(saved), as: UTF8.self).contains(tree.root), "no host path in the state")

        let server = try FuseServer(volumes: volumes)
        #expect(try server.restore(saved) == FuseServer.RestoreLosses())
        var r = Client(server: server, unique: 100)
        let attributes = Self.getattr(&r, hello)
        #expect(attributes.error == 0 && Client.size(attributes.body, attrOffset: 16) == 13)
        #expect(String(decoding: r.read(reading).body, as: UTF8.self) == "hello, guest\n")
        #expect(r.write(writing, Array("def".utf8), offset: 3).error == 0)
        #expect(tree.read(tree.shared + "/log.txt") == "abcdef", "an open file comes back without its O_TRUNC")
        #expect(r.lookup(dir, "moved.txt") == Int64(hello), "a lookup finds the node the guest already holds")
        let names = r.call(.readdir, dir, Client.u64(listing) + Client.u64(0) + Client.u32(4096) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0))
        #expect(Set(FuseServerTests.names(names.body, plus: false)) == [".", "..", "moved.txt"])
        let rootNames = r.call(.readdir, 1, Client.u64(rootListing) + Client.u64(0) + Client.u32(4096) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0))
        #expect(FuseServerTests.names(rootNames.body, plus: false) == [".", "..", "v0"])
        // New numbers continue after the saved ones (never reused).
        let (newer, newerHandle) = r.create(volume, "after.txt")
        #expect(UInt64(newer) >= saved.nextNode && newerHandle >= saved.nextHandle)
        // FORGET counts down the saved lookups.
        _ = r.server.handle(Client.request(Fuse.Opcode.forget.rawValue, node: dir, unique: 1, Client.u64(1)), replyLimit: 4096)
        #expect(Self.getattr(&r, dir).error == -ESTALE)
    }

    @Test func filesGoneSinceTheSaveAreLostNotFatal() throws {
        let tree = try Tree()
        let volumes = [SharedVolume(path: tree.shared, readOnly: false), SharedVolume(path: tree.shared + "/dir", readOnly: true)]
        var c = try FuseServerTests().client(volumes)
        let volume = UInt64(c.lookup(1, "v0"))
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        let handle = UInt64(c.open(hello, flags: O_RDONLY))
        let (doomed, doomedHandle) = c.create(volume, "doomed.txt")
        #expect(unlink(tree.shared + "/doomed.txt") == 0)
        let saved = c.server.saveState()
        #expect(!saved.nodes.contains { $0.id == UInt64(doomed) } && !saved.handles.contains { $0.id == doomedHandle },
                "a file removed before the save is not saved")
        #expect(unlink(tree.shared + "/hello.txt") == 0)

        let server = try FuseServer(volumes: volumes)
        #expect(try server.restore(saved) == FuseServer.RestoreLosses(nodes: 1, handles: 1))
        var r = Client(server: server, unique: 100)
        #expect(Self.getattr(&r, hello).error == -ESTALE)
        #expect(r.read(handle).error == -EBADF)
        #expect(r.read(doomedHandle).error == -EBADF)
        #expect(Self.getattr(&r, volume).error == 0, "the rest is there")
    }

    @Test func savedTablesThatLieAreRefused() throws {
        let tree = try Tree()
        var limits = FuseServer.Limits()
        limits.nodes = 4
        let server = try FuseServer(volumes: [SharedVolume(path: tree.shared, readOnly: false)], limits: limits)
        func node(_ id: UInt64, _ names: [String], volume: Int = 0, lookups: UInt64 = 1) -> FileServerState.SavedNode {
            .init(id: id, volume: volume, names: names.map { Array($0.utf8) }, lookups: lookups)
        }
        func state(_ nodes: [FileServerState.SavedNode], _ handles: [FileServerState.SavedHandle] = []) -> FileServerState {
            FileServerState(initialized: true, nextNode: 10, nextHandle: 10, nodes: nodes, handles: handles)
        }
        let bad: [(String, FileServerState)] = [
            ("..", state([node(2, [".."])])),
            ("a slash in a name", state([node(2, ["dir/../.."])])),
            ("an empty name", state([node(2, [""])])),
            ("a NUL in a name", state([node(2, ["hello.txt\0"])])),
            ("another volume", state([node(2, [], volume: 1)])),
            ("a negative volume", state([node(2, [], volume: -1)])),
            ("the root's number", state([node(1, [])])),
            ("a number past the next", state([node(10, [])])),
            ("a number twice", state([node(2, []), node(2, ["dir"])])),
            ("no lookups", state([node(2, [], lookups: 0)])),
            ("more nodes than the limit", state((2..<7).map { node(UInt64($0), []) })),
            ("a handle past the next", state([], [.init(id: 10, node: 1, volume: nil, names: [], directory: true, flags: O_RDONLY)])),
            ("a root handle with names", state([], [.init(id: 1, node: 1, volume: nil, names: [Array("dir".utf8)], directory: true, flags: O_RDONLY)])),
            ("a handle of another volume", state([], [.init(id: 1, node: 2, volume: 3, names: [], directory: true, flags: O_RDONLY)])),
        ]
        for (what, saved) in bad {
            #expect(throws: SwiftletError.self, "\(what)") { try server.restore(saved) }
            #expect(server.nodeCount == 0 && server.handleCount == 0, "\(what): nothing taken")
        }
        // Well-formed names that lead through a symlink are not followed: lost, not opened.
        let through = state([node(2, ["escape-dir", "etc"]), node(3, ["dotdot", "outside"]), node(4, ["escape-file"])],
                            [.init(id: 1, node: 4, volume: 0, names: [Array("escape-file".utf8)], directory: false, flags: O_RDONLY)])
        #expect(try server.restore(through) == FuseServer.RestoreLosses(nodes: 2, handles: 1))
        var r = Client(server: server, unique: 100)
        let link = Self.getattr(&r, 4)
        #expect(link.error == 0 && Client.mode(link.body, attrOffset: 16) & S_IFMT == S_IFLNK, "the symlink itself, never its target")
        #expect(r.read(1).error == -EBADF)
    }

    @Test func aReadOnlyVolumeGetsNoWritableFileBack() throws {
        let tree = try Tree()
        let saved = FileServerState(initialized: true, nextNode: 3, nextHandle: 3, nodes: [.init(id: 2, volume: 0, names: [Array("hello.txt".utf8)], lookups: 1)],
                                    handles: [.init(id: 1, node: 2, volume: 0, names: [Array("hello.txt".utf8)], directory: false, flags: O_RDWR),
                                              .init(id: 2, node: 2, volume: 0, names: [Array("hello.txt".utf8)], directory: false, flags: O_RDONLY | O_TRUNC)])
        let server = try FuseServer(volumes: [SharedVolume(path: tree.shared, readOnly: true)])
        #expect(try server.restore(saved) == FuseServer.RestoreLosses(nodes: 0, handles: 1))
        var r = Client(server: server, unique: 100)
        #expect(String(decoding: r.read(2).body, as: UTF8.self) == "hello, guest\n", "O_TRUNC is never applied again")
        #expect(r.write(2, [1]).error == -EBADF)
    }

    @Test func namesBeneathTheRootAreSplitOnlyBeneathIt() {
        func n(_ path: String, _ root: String) -> [String]? {
            FuseServer.names(of: Array(path.utf8), beneath: Array(root.utf8))?.map { String(decoding: $0, as: UTF8.self) }
        }
        #expect(n("/a/b", "/a/b") == [])
        #expect(n("/a/b/c/d", "/a/b") == ["c", "d"])
        #expect(n("/a/bc", "/a/b") == nil)
        #expect(n("/a", "/a/b") == nil)
        #expect(n("/x/y", "/") == ["x", "y"])
    }
}
