import Devices
import Glibc
import SwiftletSystem

/// The virtio-fs file server (`FuseServer`) fed request sequences as a hostile guest kernel
/// would send them, over a scratch tree: a writable volume, a read-only one, and files beside
/// them that no request may reach. Invariants: every reply answers its request with a length
/// field that is its length and fits the reply buffer; nothing outside the writable volume
/// changes (the read-only volume and the files beside the volumes included); what the server
/// holds stays within its limits.
///
/// Input: a configuration byte (bit 0: the reply limit is small), then requests, each a 2-byte
/// little-endian length and that many bytes (header and body as the guest sends them). INIT is
/// sent first, so the rest reaches every opcode.
enum FuseFuzz {
    /// The scratch tree, made once per process; the writable volume is emptied every 100 runs.
    struct Scratch {
        let root: String
        var writable: String { root + "/rw" }
        var readOnly: String { root + "/ro" }
        var outside: String { root + "/outside" }

        static let outsideText = Array("not the guest's\n".utf8)

        init() {
            var template = Array("/tmp/swiftlet-fuzz-fuse-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { fatalError("mkdtemp: \(errno)") }
            root = String(cString: made)
            mkdir(readOnly, 0o755)
            write(outside, Self.outsideText)
            write(readOnly + "/file", Array("read-only\n".utf8))
            symlink(outside, readOnly + "/escape")
            refill()
        }

        func write(_ path: String, _ bytes: [UInt8]) {
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            precondition(fd >= 0)
            _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }

        /// The writable volume as each run starts from it (every so often: runs add to it).
        func refill() {
            removeTree(writable)
            mkdir(writable, 0o755)
            mkdir(writable + "/dir", 0o755)
            write(writable + "/file", Array("hello\n".utf8))
            symlink(outside, writable + "/escape")
            symlink("/", writable + "/root")
            symlink("..", writable + "/up")
        }

        func removeTree(_ path: String) {
            var st = stat()
            guard lstat(path, &st) == 0 else { return }
            if st.st_mode & S_IFMT == S_IFDIR {
                chmod(path, 0o755)
                if let dir = opendir(path) {
                    while let entry = readdir(dir) {
                        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                        if name != "." && name != ".." { removeTree(path + "/" + name) }
                    }
                    closedir(dir)
                }
                rmdir(path)
            } else {
                unlink(path)
            }
        }

        /// The names directly in `path`.
        func names(_ path: String) -> Set<String> {
            var result = Set<String>()
            guard let dir = opendir(path) else { return result }
            while let entry = readdir(dir) {
                result.insert(withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) })
            }
            closedir(dir)
            return result
        }

        func contents(_ path: String) -> [UInt8] {
            let fd = open(path, O_RDONLY)
            guard fd >= 0 else { return [] }
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            return Array(buffer.prefix(max(n, 0)))
        }

        /// Nothing outside the writable volume changed.
        func check() {
            precondition(names(root) == [".", "..", "rw", "ro", "outside"], "a file appeared beside the volumes: \(names(root))")
            precondition(names(readOnly) == [".", "..", "file", "escape"], "the read-only volume changed: \(names(readOnly))")
            precondition(contents(readOnly + "/file") == Array("read-only\n".utf8), "a read-only file changed")
            precondition(contents(outside) == Self.outsideText, "a file outside the volumes changed")
            var st = stat()
            precondition(stat(outside, &st) == 0 && st.st_mode & 0o7777 == 0o644, "a file outside the volumes changed its mode")
            precondition(lstat(readOnly + "/file", &st) == 0 && st.st_mode & 0o7777 == 0o644, "a read-only file changed its mode")
        }
    }

    nonisolated(unsafe) static var scratch: Scratch?
    nonisolated(unsafe) static var runs = 0

    static func run(_ bytes: [UInt8]) {
        if scratch == nil {
            #if SWIFTLET_LIBFUZZER
            // Files the requests make stay small (a write or fallocate past 1 MiB fails with
            // EFBIG), so no input fills the disk. Only in the fuzzer's own process: the unit
            // tests replay the corpus in theirs, whose other tests write large files.
            var limit = rlimit(rlim_cur: 1 << 20, rlim_max: 1 << 20)
            _ = setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
            signal(SIGXFSZ, SIG_IGN)
            #endif
            scratch = Scratch()
            atexit { FuseFuzz.scratch?.removeTree(FuseFuzz.scratch!.root) }
        }
        let tree = scratch!
        runs += 1
        if runs % 100 == 0 { tree.refill() }
        var limits = FuseServer.Limits()
        limits.nodes = 64
        limits.handles = 16
        guard let server = try? FuseServer(volumes: [SharedVolume(path: tree.writable, readOnly: false),
                                                     SharedVolume(path: tree.readOnly, readOnly: true)], limits: limits) else {
            preconditionFailure("the scratch volumes open")
        }
        var input = FuzzInput(bytes)
        let replyLimit = input.byte() & 1 != 0 ? 200 : (1 << 20) + 4096
        _ = server.handle(initRequest, replyLimit: 4096)
        var count = 0
        while !input.isAtEnd && count < 64 {
            count += 1
            let length = Int(input.integer(UInt16.self))
            let request = input.take(length)
            guard let reply = server.handle(request, replyLimit: replyLimit) else { continue }
            precondition(reply.count >= 16 && reply.count <= replyLimit, "a reply of \(reply.count) bytes for a limit of \(replyLimit)")
            precondition(Int(LittleEndian.read(reply, at: 0, count: 4)) == reply.count, "a reply's length field is not its length")
            precondition(request.count >= 16 && Array(reply[8..<16]) == Array(request[8..<16]), "a reply does not answer its request")
            precondition(server.nodeCount <= limits.nodes && server.handleCount <= limits.handles, "the server holds more than its limits")
        }
        server.reset()
        tree.check()
    }

    static let initRequest: [UInt8] = request(opcode: 26, node: 0, unique: 1,
                                              body: littleEndian(UInt32(7)) + littleEndian(UInt32(38)) + littleEndian(UInt32(0)) + littleEndian(UInt32(0xFFFF_FFFF)) + [UInt8](repeating: 0, count: 48))

    static func request(opcode: UInt32, node: UInt64, unique: UInt64, body: [UInt8]) -> [UInt8] {
        littleEndian(UInt32(40 + body.count)) + littleEndian(opcode) + littleEndian(unique) + littleEndian(node)
            + littleEndian(UInt32(0)) + littleEndian(UInt32(0)) + littleEndian(UInt32(1)) + littleEndian(UInt32(0)) + body
    }

    static func framed(_ requests: [[UInt8]]) -> [UInt8] {
        requests.flatMap { littleEndian(UInt16($0.count)) + $0 }
    }

    static func seeds() throws -> [[UInt8]] {
        func name(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }
        let u32 = { (v: UInt32) in littleEndian(v) }
        let u64 = { (v: UInt64) in littleEndian(v) }
        let readIn = { (fh: UInt64) in u64(fh) + u64(0) + u32(4096) + u32(0) + u64(0) + u32(0) + u32(0) }
        // Node 2: v0 (rw), 3: its file, 4: the escape symlink; 5: v1 (ro) and so on, in lookup order.
        let browse = framed([
            request(opcode: 1, node: 1, unique: 2, body: name("v0")),
            request(opcode: 1, node: 2, unique: 3, body: name("file")),
            request(opcode: 14, node: 3, unique: 4, body: u32(2) + u32(0)),
            request(opcode: 15, node: 3, unique: 5, body: readIn(1)),
            request(opcode: 16, node: 3, unique: 6, body: u64(1) + u64(0) + u32(3) + u32(0) + u64(0) + u32(0) + u32(0) + [65, 66, 67]),
            request(opcode: 27, node: 2, unique: 7, body: u32(0) + u32(0)),
            request(opcode: 44, node: 2, unique: 8, body: readIn(2)),
            request(opcode: 18, node: 3, unique: 9, body: u64(1) + u32(0) + u32(0) + u64(0)),
        ])
        let escape = framed([
            request(opcode: 1, node: 1, unique: 2, body: name("v0")),
            request(opcode: 1, node: 2, unique: 3, body: name("escape")),
            request(opcode: 14, node: 3, unique: 4, body: u32(1) + u32(0)),
            request(opcode: 1, node: 2, unique: 5, body: name("root")),
            request(opcode: 1, node: 4, unique: 6, body: name("etc")),
            request(opcode: 1, node: 2, unique: 7, body: name("..")),
            request(opcode: 12, node: 2, unique: 8, body: u64(2) + name("file") + name("../stolen")),
            request(opcode: 35, node: 2, unique: 9, body: u32(0o101) + u32(0o104755) + u32(0) + u32(0) + name("escape")),
        ])
        let changes = framed([
            request(opcode: 1, node: 1, unique: 2, body: name("v0")),
            request(opcode: 9, node: 2, unique: 3, body: u32(0o755) + u32(0) + name("d")),
            request(opcode: 35, node: 3, unique: 4, body: u32(0o102) + u32(0o100644) + u32(0) + u32(0) + name("f")),
            request(opcode: 6, node: 2, unique: 5, body: name("s") + name("/etc/passwd")),
            request(opcode: 13, node: 2, unique: 6, body: u64(4) + name("hard")),
            request(opcode: 45, node: 2, unique: 7, body: u64(3) + u32(2) + u32(0) + name("file") + name("f")),
            request(opcode: 21, node: 4, unique: 8, body: u32(1) + u32(0) + name("security.capability") + [1]),
            request(opcode: 11, node: 2, unique: 9, body: name("d")),
            request(opcode: 1, node: 1, unique: 10, body: name("v1")),
            request(opcode: 10, node: 7, unique: 11, body: name("file")),
            request(opcode: 42, node: 0, unique: 12, body: u32(2) + u32(0) + u64(3) + u64(1) + u64(4) + u64(9)),
        ])
        return [[0] + browse, [1] + browse, [0] + escape, [0] + changes]
    }
}
