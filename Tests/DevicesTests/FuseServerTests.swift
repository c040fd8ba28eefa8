import Foundation
import Synchronization
import Glibc
import GuestMemory
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

/// The virtio-fs file server driven with FUSE requests as a guest kernel sends them, and with
/// hostile ones, without a guest.
@Suite struct FuseServerTests {
    /// A scratch directory with a shared tree (`shared`) and a file outside it (`outside`).
    final class Tree {
        let root: String
        init() throws {
            var template = Array("/var/tmp/swiftlet-fuse-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw SwiftletError(.invalidArgument, "mkdtemp failed") }
            root = String(cString: made)
            mkdir(shared, 0o755)
            mkdir(shared + "/dir", 0o755)
            try write(shared + "/hello.txt", "hello, guest\n")
            try write(root + "/outside", "host secret\n")
            symlink(root + "/outside", shared + "/escape-file")
            symlink("/", shared + "/escape-dir")
            symlink("..", shared + "/dotdot")
        }
        var shared: String { root + "/shared" }
        func write(_ path: String, _ text: String) throws { try Data(text.utf8).write(to: URL(fileURLWithPath: path)) }
        func read(_ path: String) -> String? { (try? Data(contentsOf: URL(fileURLWithPath: path))).map { String(decoding: $0, as: UTF8.self) } }
        deinit { _ = try? FileManager.default.removeItem(atPath: root) }
    }

    /// A guest's side of FUSE: builds requests and splits replies.
    struct Client {
        let server: FuseServer
        var unique: UInt64 = 1

        struct Reply {
            var error: Int32
            var body: [UInt8]
            var reader: Reader { Reader(bytes: body) }
        }

        struct Reader {
            let bytes: [UInt8]
            var at = 0
            mutating func u32() -> UInt32 { defer { at += 4 }; return UInt32(LittleEndian.read(bytes, at: at, count: 4)) }
            mutating func u64() -> UInt64 { defer { at += 8 }; return LittleEndian.read(bytes, at: at, count: 8) }
        }

        static func u32(_ v: UInt32) -> [UInt8] { LittleEndian.bytes(UInt64(v), 4) }
        static func u64(_ v: UInt64) -> [UInt8] { LittleEndian.bytes(v, 8) }
        static func name(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }

        static func request(_ opcode: UInt32, node: UInt64, unique: UInt64, _ body: [UInt8]) -> [UInt8] {
            u32(UInt32(40 + body.count)) + u32(opcode) + u64(unique) + u64(node) + u32(0) + u32(0) + u32(1) + u32(0) + body
        }

        mutating func call(_ opcode: Fuse.Opcode, _ node: UInt64, _ body: [UInt8] = [], limit: Int = (1 << 20) + 4096) -> Reply {
            unique += 1
            guard let reply = server.handle(Self.request(opcode.rawValue, node: node, unique: unique, body), replyLimit: limit) else {
                return Reply(error: Int32.min, body: [])
            }
            let length = Int(LittleEndian.read(reply, at: 0, count: 4))
            precondition(length == reply.count, "the reply's length field is its length")
            precondition(LittleEndian.read(reply, at: 8, count: 8) == unique, "the reply answers the request")
            return Reply(error: Int32(bitPattern: UInt32(LittleEndian.read(reply, at: 4, count: 4))), body: Array(reply.dropFirst(16)))
        }

        mutating func initialize() -> Reply {
            call(.initialize, 0, Self.u32(7) + Self.u32(38) + Self.u32(128 << 10) + Self.u32(0x3FFF_FFFF) + [UInt8](repeating: 0, count: 48))
        }

        /// LOOKUP: the node id (or the negated errno).
        mutating func lookup(_ parent: UInt64, _ name: String) -> Int64 {
            let r = call(.lookup, parent, Self.name(name))
            guard r.error == 0 else { return Int64(r.error) }
            var reader = r.reader
            return Int64(reader.u64())
        }

        mutating func open(_ node: UInt64, flags: Int32) -> Int64 {
            let r = call(.open, node, Self.u32(UInt32(bitPattern: flags)) + Self.u32(0))
            guard r.error == 0 else { return Int64(r.error) }
            var reader = r.reader
            return Int64(reader.u64())
        }

        mutating func read(_ fh: UInt64, offset: UInt64 = 0, size: UInt32 = 4096, limit: Int = (1 << 20) + 4096) -> Reply {
            call(.read, 0, Self.u64(fh) + Self.u64(offset) + Self.u32(size) + Self.u32(0) + Self.u64(0) + Self.u32(0) + Self.u32(0), limit: limit)
        }

        mutating func write(_ fh: UInt64, _ data: [UInt8], offset: UInt64 = 0, claimed: UInt32? = nil) -> Reply {
            call(.write, 0, Self.u64(fh) + Self.u64(offset) + Self.u32(claimed ?? UInt32(data.count)) + Self.u32(0) + Self.u64(0) + Self.u32(0) + Self.u32(0) + data)
        }

        /// CREATE: (node, handle) or the negated errno as node.
        mutating func create(_ parent: UInt64, _ name: String, mode: UInt32 = 0o644, flags: Int32 = O_RDWR) -> (Int64, UInt64) {
            let r = call(.create, parent, Self.u32(UInt32(bitPattern: flags)) + Self.u32(S_IFREG | mode) + Self.u32(0o022) + Self.u32(0) + Self.name(name))
            guard r.error == 0 else { return (Int64(r.error), 0) }
            var reader = r.reader
            let node = reader.u64()
            reader.at = 128
            return (Int64(node), reader.u64())
        }

        mutating func mkdir(_ parent: UInt64, _ name: String) -> Int64 {
            let r = call(.mkdir, parent, Self.u32(0o755) + Self.u32(0o022) + Self.name(name))
            guard r.error == 0 else { return Int64(r.error) }
            var reader = r.reader
            return Int64(reader.u64())
        }

        /// The mode in an entry or attribute reply (`attrOffset`: where struct fuse_attr starts).
        static func mode(_ body: [UInt8], attrOffset: Int) -> UInt32 { UInt32(LittleEndian.read(body, at: attrOffset + 60, count: 4)) }
        static func uid(_ body: [UInt8], attrOffset: Int) -> UInt32 { UInt32(LittleEndian.read(body, at: attrOffset + 68, count: 4)) }
        static func size(_ body: [UInt8], attrOffset: Int) -> UInt64 { LittleEndian.read(body, at: attrOffset + 8, count: 8) }
    }

    func client(_ volumes: [SharedVolume], limits: FuseServer.Limits = .init()) throws -> Client {
        var client = Client(server: try FuseServer(volumes: volumes, limits: limits))
        #expect(client.initialize().error == 0)
        return client
    }

    @Test func initNegotiatesAndRefusesOtherMajorsAndRequestsBeforeIt() throws {
        let tree = try Tree()
        var c = Client(server: try FuseServer(volumes: [SharedVolume(path: tree.shared, readOnly: false)]))
        #expect(c.lookup(1, "v0") == -Int64(EIO), "nothing is served before INIT")
        let old = c.call(.initialize, 0, Client.u32(6) + Client.u32(38) + Client.u32(0) + Client.u32(0))
        #expect(old.error == -EPROTO)
        let r = c.initialize()
        #expect(r.error == 0 && r.body.count == 64)
        var reader = r.reader
        #expect(reader.u32() == 7 && reader.u32() == 31)
        _ = reader.u32()
        let flags = reader.u32()
        #expect(flags & Fuse.InitFlag.maxPages != 0 && flags & Fuse.InitFlag.doReaddirplus != 0)
        reader.at = 20
        #expect(reader.u32() == UInt32(FuseServer.maximumTransfer), "max_write")
    }

    @Test func readsHostFilesAndTheRootListsTheVolumes() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: false), SharedVolume(path: tree.shared + "/dir", readOnly: true)])
        #expect(c.lookup(1, "v2") == 0, "a missing name is node 0: a negative entry")
        let missing = c.call(.lookup, 1, Client.name("nothing-here"))
        #expect(missing.error == 0 && missing.body.count == 128 && LittleEndian.read(missing.body, at: 16, count: 8) == 1,
                "the guest may remember the miss for a second")
        let volume = try #require(UInt64(exactly: c.lookup(1, "v0")))
        let file = try #require(UInt64(exactly: c.lookup(volume, "hello.txt")))
        let attributes = c.call(.getattr, file, Client.u32(0) + Client.u32(0) + Client.u64(0))
        #expect(attributes.error == 0 && Client.size(attributes.body, attrOffset: 16) == 13)
        #expect(Client.uid(attributes.body, attrOffset: 16) == 0, "the host user's files are root's in the guest")
        let fh = try #require(UInt64(exactly: c.open(file, flags: O_RDONLY)))
        let data = c.read(fh)
        #expect(data.error == 0 && String(decoding: data.body, as: UTF8.self) == "hello, guest\n")
        #expect(c.call(.release, 0, Client.u64(fh) + Client.u32(0) + Client.u32(0) + Client.u64(0)).error == 0)
        // The root lists . .. v0 v1.
        let dir = c.call(.opendir, 1, Client.u32(0) + Client.u32(0))
        var reader = dir.reader
        let dh = reader.u64()
        let listing = c.call(.readdir, 1, Client.u64(dh) + Client.u64(0) + Client.u32(4096) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0))
        #expect(Self.names(listing.body, plus: false) == [".", "..", "v0", "v1"])
    }

    @Test func writeOnlyFilesAreOpenedForDirectIOAndOthersCached() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: false)])
        let volume = UInt64(c.lookup(1, "v0"))
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        func openFlags(_ flags: Int32) -> UInt32 {
            let r = c.call(.open, hello, Client.u32(UInt32(bitPattern: flags)) + Client.u32(0))
            return r.error == 0 ? UInt32(LittleEndian.read(r.body, at: 8, count: 4)) : UInt32.max
        }
        #expect(openFlags(O_WRONLY) == Fuse.OpenFlag.directIO)
        #expect(openFlags(O_WRONLY | O_APPEND) == Fuse.OpenFlag.directIO)
        #expect(openFlags(O_RDONLY) == 0 && openFlags(O_RDWR) == 0, "readable files keep the page cache (and mmap)")
        let made = c.call(.create, volume, Client.u32(UInt32(O_WRONLY | O_TRUNC)) + Client.u32(S_IFREG | 0o644) + Client.u32(0o022) + Client.u32(0) + Client.name("out"))
        #expect(made.error == 0 && LittleEndian.read(made.body, at: 128 + 8, count: 4) == UInt64(Fuse.OpenFlag.directIO))
        let dir = c.call(.opendir, volume, Client.u32(UInt32(O_WRONLY)) + Client.u32(0))
        #expect(dir.error == 0 && LittleEndian.read(dir.body, at: 8, count: 4) == 0)
    }

    static func names(_ body: [UInt8], plus: Bool) -> [String] {
        var names: [String] = []
        var at = 0
        while at < body.count {
            if plus { at += 128 }
            let length = Int(LittleEndian.read(body, at: at + 16, count: 4))
            names.append(String(decoding: body[(at + 24)..<(at + 24 + length)], as: UTF8.self))
            at += 24 + (length + 7) / 8 * 8
        }
        return names
    }

    @Test func writesReachTheHostAtOnceOwnedByTheUserWithoutSetID() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: false)])
        let volume = UInt64(c.lookup(1, "v0"))
        let (node, fh) = c.create(volume, "new.txt", mode: 0o4755)
        #expect(node > 0)
        let written = c.write(fh, Array("from the guest".utf8))
        #expect(written.error == 0 && LittleEndian.read(written.body, at: 0, count: 4) == 14)
        #expect(tree.read(tree.shared + "/new.txt") == "from the guest")
        var st = stat()
        #expect(stat(tree.shared + "/new.txt", &st) == 0)
        #expect(st.st_uid == geteuid() && st.st_mode & 0o7777 == 0o755, "no set-user-ID bit on a host file")
        // chmod with set-group-ID: stripped too; truncate through SETATTR.
        var setattr = [UInt8](repeating: 0, count: 88)
        LittleEndian.write(UInt64(Fuse.SetattrValid.mode | Fuse.SetattrValid.size), 4, into: &setattr, at: 0)
        LittleEndian.write(4, 8, into: &setattr, at: 16)
        LittleEndian.write(UInt64(S_IFREG | 0o2777), 4, into: &setattr, at: 68)
        let changed = c.call(.setattr, UInt64(node), setattr)
        #expect(changed.error == 0 && Client.size(changed.body, attrOffset: 16) == 4)
        #expect(stat(tree.shared + "/new.txt", &st) == 0 && st.st_mode & 0o7777 == 0o777 && st.st_size == 4)
        // mkdir, rename, link, symlink, readlink, unlink, rmdir.
        let dir = c.mkdir(volume, "made")
        #expect(dir > 0)
        #expect(c.call(.rename, volume, Client.u64(UInt64(dir)) + Client.name("new.txt") + Client.name("moved.txt")).error == 0)
        #expect(tree.read(tree.shared + "/made/moved.txt") == "from")
        let moved = UInt64(c.lookup(UInt64(dir), "moved.txt"))
        #expect(c.call(.link, volume, Client.u64(moved) + Client.name("hard.txt")).error == 0)
        #expect(tree.read(tree.shared + "/hard.txt") == "from")
        #expect(c.call(.symlink, volume, Client.name("link") + Client.name("made/moved.txt")).error == 0)
        let link = UInt64(c.lookup(volume, "link"))
        #expect(String(decoding: c.call(.readlink, link).body, as: UTF8.self) == "made/moved.txt")
        #expect(c.call(.unlink, UInt64(dir), Client.name("moved.txt")).error == 0)
        #expect(c.call(.rmdir, volume, Client.name("made")).error == 0)
        #expect(access(tree.shared + "/made", F_OK) != 0)
        #expect(c.call(.mknod, volume, Client.u32(S_IFIFO | 0o644) + Client.u32(0) + Client.u32(0) + Client.u32(0) + Client.name("fifo")).error == -EPERM)
    }

    @Test func namesAndSymlinksCannotLeaveTheSharedDirectory() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: false)])
        let volume = UInt64(c.lookup(1, "v0"))
        for name in ["..", ".", "../outside", "dir/../../outside", "", "a\u{0}b"] {
            #expect(c.lookup(volume, name) <= 0, "\(name) finds nothing")
        }
        #expect(c.lookup(1, "..") < 0)
        // A symlink is a node of its own: never followed on the host.
        let escapeFile = UInt64(c.lookup(volume, "escape-file"))
        #expect(c.open(escapeFile, flags: O_RDONLY) < 0)
        #expect(c.open(escapeFile, flags: O_WRONLY | O_TRUNC) < 0)
        #expect(tree.read(tree.root + "/outside") == "host secret\n")
        let escapeDir = UInt64(c.lookup(volume, "escape-dir"))
        #expect(c.lookup(escapeDir, "etc") < 0, "a symlink is no directory to look in")
        #expect(c.mkdir(escapeDir, "x") < 0)
        #expect(c.create(escapeDir, "x").0 < 0)
        let dotdot = UInt64(c.lookup(volume, "dotdot"))
        #expect(c.lookup(dotdot, "outside") < 0)
        // Creating over a symlink does not write where it points.
        #expect(c.create(volume, "escape-file", flags: O_RDWR).0 < 0)
        #expect(tree.read(tree.root + "/outside") == "host secret\n")
        // Links of symlinks and of directories are refused; names with a slash too.
        #expect(c.call(.link, volume, Client.u64(escapeFile) + Client.name("second")).error == -EPERM)
        #expect(c.call(.rename, volume, Client.u64(volume) + Client.name("hello.txt") + Client.name("../stolen")).error == -EINVAL)
        #expect(access(tree.root + "/stolen", F_OK) != 0)
        // Attributes of a symlink are its own.
        var setattr = [UInt8](repeating: 0, count: 88)
        LittleEndian.write(UInt64(Fuse.SetattrValid.mode), 4, into: &setattr, at: 0)
        LittleEndian.write(0o777, 4, into: &setattr, at: 68)
        #expect(c.call(.setattr, escapeFile, setattr).error != 0)
        var st = stat()
        #expect(stat(tree.root + "/outside", &st) == 0 && st.st_mode & 0o777 != 0o777)
        // Only user.* extended attributes may be set.
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        #expect(c.call(.setxattr, hello, Client.u32(1) + Client.u32(0) + Client.name("security.capability") + [1]).error == -EPERM)
        #expect(c.call(.setxattr, hello, Client.u32(1) + Client.u32(0) + Client.name("trusted.x") + [1]).error == -EPERM)
        // A user.* attribute goes to the host file and back (where the host file system keeps them).
        let set = c.call(.setxattr, hello, Client.u32(3) + Client.u32(0) + Client.name("user.swiftlet") + [7, 8, 9])
        if set.error != -EOPNOTSUPP {
            #expect(set.error == 0)
            let length = c.call(.getxattr, hello, Client.u32(0) + Client.u32(0) + Client.name("user.swiftlet"))
            #expect(length.error == 0 && LittleEndian.read(length.body, at: 0, count: 4) == 3)
            #expect(c.call(.getxattr, hello, Client.u32(64) + Client.u32(0) + Client.name("user.swiftlet")).body == [7, 8, 9])
            #expect(c.call(.getxattr, hello, Client.u32(1) + Client.u32(0) + Client.name("user.swiftlet")).error == -ERANGE)
            #expect(String(decoding: c.call(.listxattr, hello, Client.u32(256) + Client.u32(0)).body, as: UTF8.self).contains("user.swiftlet"))
            #expect(c.call(.removexattr, hello, Client.name("user.swiftlet")).error == 0)
            #expect(c.call(.getxattr, hello, Client.u32(64) + Client.u32(0) + Client.name("user.swiftlet")).error == -ENODATA)
        }
        // Not through a symlink: its target's attributes stay the host's.
        #expect(c.call(.getxattr, escapeFile, Client.u32(64) + Client.u32(0) + Client.name("user.x")).error == -EINVAL)
    }

    @Test func aReadOnlyVolumeRefusesEveryChangeOnTheHost() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: true)])
        let volume = UInt64(c.lookup(1, "v0"))
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        #expect(c.create(volume, "x").0 == -Int64(EROFS))
        #expect(c.mkdir(volume, "x") == -Int64(EROFS))
        #expect(c.open(hello, flags: O_RDWR) == -Int64(EROFS))
        #expect(c.open(hello, flags: O_RDONLY | O_TRUNC) == -Int64(EROFS))
        #expect(c.call(.unlink, volume, Client.name("hello.txt")).error == -EROFS)
        #expect(c.call(.rename, volume, Client.u64(volume) + Client.name("hello.txt") + Client.name("x")).error == -EROFS)
        #expect(c.call(.symlink, volume, Client.name("l") + Client.name("x")).error == -EROFS)
        var setattr = [UInt8](repeating: 0, count: 88)
        LittleEndian.write(UInt64(Fuse.SetattrValid.size), 4, into: &setattr, at: 0)
        #expect(c.call(.setattr, hello, setattr).error == -EROFS)
        // A read-only handle cannot write either.
        let fh = UInt64(c.open(hello, flags: O_RDONLY))
        #expect(c.write(fh, [1, 2, 3]).error == -EBADF)
        #expect(tree.read(tree.shared + "/hello.txt") == "hello, guest\n")
        // The server's root is read-only too.
        #expect(c.mkdir(1, "v9") == -Int64(EROFS))
    }

    @Test func badNodesHandlesAndSizesAreRefusedOrBounded() throws {
        let tree = try Tree()
        var c = try client([SharedVolume(path: tree.shared, readOnly: false), SharedVolume(path: tree.shared + "/dir", readOnly: false)])
        let volume = UInt64(c.lookup(1, "v0"))
        #expect(c.lookup(987_654, "x") == -Int64(ESTALE))
        #expect(c.read(42).error == -EBADF)
        let hello = UInt64(c.lookup(volume, "hello.txt"))
        let fh = UInt64(c.open(hello, flags: O_RDWR))
        // A read asking for 4 GiB gets at most what the reply may hold.
        let big = c.read(fh, size: UInt32.max, limit: 1024)
        #expect(big.error == 0 && big.body.count <= 1024 - 16)
        // A write claiming more data than it carries, or more than max_write.
        #expect(c.write(fh, [1, 2, 3], claimed: 4096).error == -EINVAL)
        #expect(c.write(fh, [1], claimed: UInt32.max).error == -EINVAL)
        // Offsets past what a file can have.
        #expect(c.write(fh, [1], offset: UInt64.max).error != 0)
        #expect(c.read(fh, offset: UInt64.max).error != 0)
        // Releasing twice, and a directory handle as a file's.
        #expect(c.call(.release, 0, Client.u64(fh) + Client.u32(0) + Client.u32(0) + Client.u64(0)).error == 0)
        #expect(c.call(.release, 0, Client.u64(fh) + Client.u32(0) + Client.u32(0) + Client.u64(0)).error == -EBADF)
        // Truncated bodies and headers.
        #expect(c.call(.lookup, volume, Array("no-nul".utf8)).error == -EINVAL)
        #expect(c.call(.read, 0, [1, 2, 3]).error == -EINVAL)
        #expect(c.call(.setattr, hello, [UInt8](repeating: 0, count: 10)).error == -EINVAL)
        #expect(c.server.handle([1, 2, 3], replyLimit: 4096) == nil)
        var lying = Client.request(Fuse.Opcode.getattr.rawValue, node: hello, unique: 9, [])
        LittleEndian.write(1 << 20, 4, into: &lying, at: 0)
        #expect(c.server.handle(lying, replyLimit: 4096) == nil, "a header longer than the request")
        // Unknown and unserved opcodes.
        let unknown = c.server.handle(Client.request(9999, node: 1, unique: 3, []), replyLimit: 4096)!
        #expect(Int32(bitPattern: UInt32(LittleEndian.read(unknown, at: 4, count: 4))) == -ENOSYS)
        #expect(c.call(.getlk, hello).error == -ENOSYS)
        // Cross-volume rename and link.
        let other = UInt64(c.lookup(1, "v1"))
        #expect(c.call(.rename, volume, Client.u64(other) + Client.name("hello.txt") + Client.name("x")).error == -EXDEV)
        #expect(c.call(.link, other, Client.u64(hello) + Client.name("x")).error == -EXDEV)
        // A reply that does not fit says so.
        #expect(c.call(.getattr, hello, Client.u32(0) + Client.u32(0) + Client.u64(0), limit: 40).error == -ERANGE)
    }

    @Test func nodesAndHandlesAreBoundedAndForgetFreesThem() throws {
        let tree = try Tree()
        for i in 0..<6 { try tree.write(tree.shared + "/f\(i)", "\(i)") }
        var limits = FuseServer.Limits()
        limits.nodes = 4
        limits.handles = 2
        var c = try client([SharedVolume(path: tree.shared, readOnly: false)], limits: limits)
        let volume = UInt64(c.lookup(1, "v0"))
        let nodes = (0..<3).map { c.lookup(volume, "f\($0)") }
        #expect(nodes.allSatisfy { $0 > 0 })
        #expect(c.lookup(volume, "f3") == -Int64(ENFILE))
        #expect(c.lookup(volume, "f0") == nodes[0], "a held file is the same node")
        #expect(c.server.nodeCount == 4)
        // FORGET (no reply) drops the node once its lookups are forgotten; BATCH_FORGET too.
        #expect(c.server.handle(Client.request(Fuse.Opcode.forget.rawValue, node: UInt64(nodes[0]), unique: 1, Client.u64(2)), replyLimit: 64) == nil)
        #expect(c.lookup(volume, "f3") > 0)
        let batch = Client.u32(2) + Client.u32(0) + Client.u64(UInt64(nodes[1])) + Client.u64(1) + Client.u64(UInt64(nodes[2])) + Client.u64(100)
        #expect(c.server.handle(Client.request(Fuse.Opcode.batchForget.rawValue, node: 0, unique: 1, batch), replyLimit: 64) == nil)
        #expect(c.server.nodeCount == 2)
        // A batch claiming more entries than it has stops at its end.
        let lyingBatch = Client.u32(UInt32.max) + Client.u32(0) + Client.u64(12345) + Client.u64(1)
        #expect(c.server.handle(Client.request(Fuse.Opcode.batchForget.rawValue, node: 0, unique: 1, lyingBatch), replyLimit: 64) == nil)
        // Forgetting the server's root or unknown nodes does nothing.
        _ = c.server.handle(Client.request(Fuse.Opcode.forget.rawValue, node: 1, unique: 1, Client.u64(1)), replyLimit: 64)
        #expect(c.lookup(1, "v0") == Int64(volume))
        let f3 = UInt64(c.lookup(volume, "f3"))
        #expect(c.open(f3, flags: O_RDONLY) > 0 && c.open(f3, flags: O_RDONLY) > 0)
        #expect(c.open(f3, flags: O_RDONLY) == -Int64(ENFILE))
        #expect(c.server.handleCount == 2)
        // DESTROY forgets everything.
        #expect(c.call(.destroy, 0).error == 0)
        #expect(c.server.nodeCount == 0 && c.server.handleCount == 0)
    }

    @Test func readdirplusGivesEntriesAndContinuesFromItsOffsets() throws {
        let tree = try Tree()
        for i in 0..<40 { try tree.write(tree.shared + "/dir/file-\(i)", "x") }
        var c = try client([SharedVolume(path: tree.shared, readOnly: false)])
        let volume = UInt64(c.lookup(1, "v0"))
        let dir = UInt64(c.lookup(volume, "dir"))
        var reader = c.call(.opendir, dir, Client.u32(0) + Client.u32(0)).reader
        let dh = reader.u64()
        var names: [String] = []
        var offset: UInt64 = 0
        for _ in 0..<100 {
            let r = c.call(.readdirplus, dir, Client.u64(dh) + Client.u64(offset) + Client.u32(1024) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0))
            #expect(r.error == 0 && r.body.count <= 1024)
            if r.body.isEmpty { break }
            // Each entry: fuse_entry_out, then the dirent; continue from the last dirent's offset.
            var at = 0
            while at < r.body.count {
                let nameLength = Int(LittleEndian.read(r.body, at: at + 128 + 16, count: 4))
                names.append(String(decoding: r.body[(at + 152)..<(at + 152 + nameLength)], as: UTF8.self))
                offset = LittleEndian.read(r.body, at: at + 128 + 8, count: 8)
                at += 152 + (nameLength + 7) / 8 * 8
            }
        }
        #expect(Set(names) == Set((0..<40).map { "file-\($0)" } + [".", ".."]))
        #expect(names.count == 42)
        #expect(c.server.nodeCount == 2 + 40, "readdirplus looks each entry up")
    }

    @Test func theDeviceServesRequestsFromItsQueueOnItsThread() throws {
        let tree = try Tree()
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        let device = try VirtioFS(volumes: [SharedVolume(path: tree.shared, readOnly: false)])
        defer { device.requestStop() }
        #expect(device.deviceType == .fileSystem)
        var config = [UInt8](repeating: 0xFF, count: 40)
        config.withUnsafeMutableBytes { device.readConfiguration(offset: 0, into: $0) }
        #expect(Array(config.prefix(8)) == Array("swiftlet".utf8) && config[8] == 0 && LittleEndian.read(config, at: 36, count: 4) == 1)
        let hiprio = VirtqueueDriver(memory: memory, base: GuestAddress(0x10000))
        var requests = VirtqueueDriver(memory: memory, base: GuestAddress(0x100000))
        let line = CountingLine()
        try device.activate(VirtioActivation(memory: memory, queues: [hiprio.queue(), requests.queue()], features: device.offeredFeatures,
                                             interrupt: VirtioInterrupt(line: line)))
        let initRequest = Client.request(Fuse.Opcode.initialize.rawValue, node: 0, unique: 7,
                                         Client.u32(7) + Client.u32(38) + Client.u32(0) + Client.u32(0) + [UInt8](repeating: 0, count: 48))
        let inBuffer = try requests.buffer(initRequest.count, bytes: initRequest)
        let outBuffer = try requests.buffer(256)
        try requests.publish(try requests.chain([(inBuffer, UInt32(initRequest.count), false), (outBuffer, 256, true)]))
        device.queueNotified(1)
        let deadline = MonotonicClock.now + 5_000_000_000
        while line.raised.load(ordering: .relaxed) == 0 && MonotonicClock.now < deadline { usleep(1000) }
        #expect(try requests.used(0) == (0, 16 + 64))
        let reply = try memory.read(count: 16, at: outBuffer)
        #expect(LittleEndian.read(reply, at: 4, count: 4) == 0 && LittleEndian.read(reply, at: 8, count: 8) == 7)

        // Requests in the shapes a guest uses: READ and WRITE go straight between the file and
        // the guest's buffers, here split over several descriptors.
        var served = 1
        func send(_ request: [UInt8], data: [UInt8] = [], replySizes: [Int]) throws -> [UInt8] {
            var buffers: [(GuestAddress, UInt32, Bool)] = [(try requests.buffer(request.count, bytes: request), UInt32(request.count), false)]
            if !data.isEmpty {
                let half = data.count / 2
                buffers.append((try requests.buffer(half, bytes: Array(data.prefix(half))), UInt32(half), false))
                buffers.append((try requests.buffer(data.count - half, bytes: Array(data.dropFirst(half))), UInt32(data.count - half), false))
            }
            let outs = try replySizes.map { try requests.buffer($0) }
            buffers += zip(outs, replySizes).map { ($0, UInt32($1), true) }
            try requests.publish(try requests.chain(buffers))
            device.queueNotified(1)
            let deadline = MonotonicClock.now + 5_000_000_000
            while line.raised.load(ordering: .relaxed) <= served && MonotonicClock.now < deadline { usleep(1000) }
            let used = try requests.used(UInt16(served))
            served += 1
            var bytes: [UInt8] = []
            for (address, size) in zip(outs, replySizes) where bytes.count < Int(used.length) {
                bytes += try memory.read(count: min(size, Int(used.length) - bytes.count), at: address)
            }
            return bytes
        }
        func entryNode(_ reply: [UInt8]) -> UInt64 { LittleEndian.read(reply, at: 16, count: 8) }
        let volume = entryNode(try send(Client.request(Fuse.Opcode.lookup.rawValue, node: 1, unique: 8, Client.name("v0")), replySizes: [256]))
        let hello = entryNode(try send(Client.request(Fuse.Opcode.lookup.rawValue, node: volume, unique: 9, Client.name("hello.txt")), replySizes: [256]))
        let opened = try send(Client.request(Fuse.Opcode.open.rawValue, node: hello, unique: 10, Client.u32(UInt32(O_RDWR)) + Client.u32(0)), replySizes: [64])
        let fh = LittleEndian.read(opened, at: 16, count: 8)
        let readIn = Client.u64(fh) + Client.u64(7) + Client.u32(100) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0)
        let read = try send(Client.request(Fuse.Opcode.read.rawValue, node: hello, unique: 11, readIn), replySizes: [16, 3, 200])
        #expect(LittleEndian.read(read, at: 0, count: 4) == 16 + 6 && String(decoding: read.dropFirst(16), as: UTF8.self) == "guest\n")
        let data = Array("written by the guest".utf8)
        let writeIn = Client.u64(fh) + Client.u64(0) + Client.u32(UInt32(data.count)) + Client.u32(0) + Client.u64(0) + Client.u32(0) + Client.u32(0)
        var request = Client.request(Fuse.Opcode.write.rawValue, node: hello, unique: 12, writeIn)
        LittleEndian.write(UInt64(request.count + data.count), 4, into: &request, at: 0)
        let written = try send(request, data: data, replySizes: [24])
        #expect(LittleEndian.read(written, at: 4, count: 4) == 0 && LittleEndian.read(written, at: 16, count: 4) == UInt64(data.count))
        #expect(tree.read(tree.shared + "/hello.txt") == "written by the guest")
        // A WRITE whose header claims more data than the chain has is refused, nothing written.
        LittleEndian.write(UInt64(request.count + 4096), 4, into: &request, at: 0)
        LittleEndian.write(4096, 4, into: &request, at: 56)
        let lying = try send(request, data: data, replySizes: [24])
        #expect(lying.count == 0 || LittleEndian.read(lying, at: 4, count: 4) != 0, "no success for a write without its data")
        #expect(tree.read(tree.shared + "/hello.txt") == "written by the guest")
        // A READ of a directory handle, and a READ with a bad handle, answer errors.
        let bad = try send(Client.request(Fuse.Opcode.read.rawValue, node: hello, unique: 13, Client.u64(999) + Array(readIn.dropFirst(8))), replySizes: [64])
        #expect(Int32(bitPattern: UInt32(LittleEndian.read(bad, at: 4, count: 4))) == -EBADF)
    }
}
