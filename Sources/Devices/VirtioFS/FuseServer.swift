import CLinux
import Glibc
import Synchronization
import SwiftletSystem

/// A host directory a machine shares with its guest.
public struct SharedVolume: Sendable, Equatable {
    /// The host directory (the user's, not the guest's, choice).
    public var path: String
    public var readOnly: Bool

    public init(path: String, readOnly: Bool) {
        self.path = path
        self.readOnly = readOnly
    }
}

/// A FUSE file server over host directories, for a virtio-fs device: it answers the FUSE
/// requests a guest kernel sends, passing them through to the host directories.
///
/// What the guest sees: a read-only root (node 1) whose entries `v0`, `v1`, ... are the volumes,
/// each the host directory it names (the guest's agent mounts each where the user asked).
///
/// Confinement (every request is hostile): files are held as O_PATH descriptors and looked up
/// one component at a time beneath their parent with openat2 (RESOLVE_BENEATH, no symlinks, no
/// magic links; `ConfinedFiles`), so no request names a host path and no host symlink is
/// followed; `..` is never looked up here (the guest's kernel walks it from its own dentries);
/// a read-only volume refuses every change on the host side (EROFS); node ids and file handles
/// are this server's own numbers, checked on every use and never reused; the nodes (each an
/// open descriptor) and handles the guest may hold are bounded (ENFILE beyond), as are request
/// and reply sizes. No set-user-ID or set-group-ID bit is ever set on a host file, and only
/// `user.` extended attributes may be set or removed.
///
/// Ownership: the host user the server runs as appears in the guest as root (uid and gid 0) and
/// host root as `nobody` (65534); files the guest creates belong to the server's host user.
public final class FuseServer: Sendable {
    /// Bounds on what the guest may hold at once.
    public struct Limits: Sendable {
        /// Looked-up files (each an O_PATH descriptor while the guest holds it).
        public var nodes: Int = 65_536
        /// Open files and directories.
        public var handles: Int = 16_384
        public init() {}
    }

    /// The largest READ or WRITE the server takes (the guest learns it from INIT's max_write
    /// and max_pages).
    public static let maximumTransfer = 1 << 20
    static let maximumPages: UInt16 = 256
    /// How long the guest may cache names and attributes (the host may change files too).
    static let cacheSeconds: UInt64 = 1
    /// The guest's root and nobody.
    static let guestRoot: UInt32 = 0
    static let nobody: UInt32 = 65_534

    struct Node {
        let file: SharedDescriptor?
        /// The volume's index (nil for the server's root).
        let volume: Int?
        let key: FileKey
        var lookups: UInt64
    }

    struct FileKey: Hashable { var device: UInt64; var inode: UInt64 }

    struct Handle {
        let file: SharedDescriptor
        let node: UInt64
        /// The volume's index (nil for the server's root).
        let volume: Int?
        let directory: Bool
        /// The host flags it was opened with, as a restore opens it again (no O_TRUNC or O_EXCL).
        let flags: Int32
        var writable: Bool { flags & O_ACCMODE != O_RDONLY }
    }

    struct State {
        var nodes: [UInt64: Node] = [:]
        var byKey: [FileKey: UInt64] = [:]
        var nextNode: UInt64 = 2
        var handles: [UInt64: Handle] = [:]
        var nextHandle: UInt64 = 1
        var initialized = false
    }

    let volumes: [(root: SharedDescriptor, readOnly: Bool, device: UInt64)]
    let limits: Limits
    let state = Mutex(State())
    private let hostUID: UInt32
    private let hostGID: UInt32

    /// Opens each volume's directory (an error names the one that cannot be opened).
    public init(volumes: [SharedVolume], limits: Limits = Limits()) throws(SwiftletError) {
        var opened: [(SharedDescriptor, Bool, UInt64)] = []
        for volume in volumes {
            let root = try ConfinedFiles.openRoot(volume.path)
            guard case .success(let st) = ConfinedFiles.status(root.rawValue), st.st_mode & S_IFMT == S_IFDIR else {
                throw SwiftletError(.invalidArgument, "\(volume.path) is not a directory")
            }
            opened.append((root, volume.readOnly, UInt64(st.st_dev)))
        }
        self.volumes = opened
        self.limits = limits
        hostUID = geteuid()
        hostGID = getegid()
    }

    /// The name of volume `index` in the server's root.
    public static func volumeName(_ index: Int) -> String { "v\(index)" }

    /// How many nodes the guest holds now (for tests and status).
    public var nodeCount: Int { state.withLock { $0.nodes.count } }
    public var handleCount: Int { state.withLock { $0.handles.count } }

    // MARK: requests

    /// Answers one request: `request` is the readable part of a chain (header and body), and
    /// the reply may be at most `replyLimit` bytes. Returns nil for a request that takes no reply
    /// (FORGET, BATCH_FORGET) or one too malformed to answer (no whole header).
    public func handle(_ request: [UInt8], replyLimit: Int) -> [UInt8]? {
        guard let header = FuseReader.header(request), header.length >= UInt32(Fuse.inHeaderSize),
              Int(header.length) <= request.count else { return nil }
        let body = FuseReader(Array(request[0..<Int(header.length)]), at: Fuse.inHeaderSize)
        guard let opcode = Fuse.Opcode(rawValue: header.opcode) else { return reply(header, .failure(FileErrno(ENOSYS)), replyLimit) }
        switch opcode {
        case .forget:
            var r = body
            if let count = r.u64() { forget(header.node, count) }
            return nil
        case .batchForget:
            var r = body
            guard let count = r.u32(), r.skip(4) else { return nil }
            for _ in 0..<min(Int(count), r.remaining / 16) {
                guard let node = r.u64(), let lookups = r.u64() else { break }
                forget(node, lookups)
            }
            return nil
        default:
            return reply(header, serve(opcode, header, body, replyLimit: replyLimit - Fuse.outHeaderSize), replyLimit)
        }
    }

    private func reply(_ header: Fuse.InHeader, _ result: Result<[UInt8], FileErrno>, _ limit: Int) -> [UInt8] {
        switch result {
        case .success(let body) where Fuse.outHeaderSize + body.count <= limit:
            return Self.replyHeader(unique: header.unique, result: .success(Fuse.outHeaderSize + body.count)) + body
        case .success:
            return Self.replyHeader(unique: header.unique, result: .failure(FileErrno(ERANGE)))
        case .failure(let e):
            return Self.replyHeader(unique: header.unique, result: .failure(e))
        }
    }

    private func serve(_ opcode: Fuse.Opcode, _ header: Fuse.InHeader, _ body: FuseReader, replyLimit: Int) -> Result<[UInt8], FileErrno> {
        var r = body
        if opcode == .initialize { return initialize(&r) }
        guard state.withLock({ $0.initialized }) else { return .failure(FileErrno(EIO)) }
        let node = header.node
        switch opcode {
        case .destroy:
            reset()
            return .success([])
        case .lookup:
            guard let name = r.cString() else { return .failure(.invalid) }
            switch lookup(node, name) {
            case .success(let entry): return .success(entryBytes(entry))
            case .failure(let e) where e == .noEntry:
                // A name that is not there: the guest may remember that as long as it remembers
                // names (node 0 with a timeout), sparing a request per miss (compilers probing
                // include paths, shells searching PATH).
                var w = FuseWriter()
                w.u64(0); w.u64(0); w.u64(Self.cacheSeconds); w.u64(0); w.u32(0); w.u32(0)
                w.zeros(88)
                return .success(w.bytes)
            case .failure(let e): return .failure(e)
            }
        case .getattr:
            return attributes(of: node).map(attributeBytes)
        case .setattr:
            return setAttributes(node, &r)
        case .readlink:
            return file(node).flatMap { ConfinedFiles.readLink($0.file!.rawValue) }
        case .symlink:
            guard let name = r.cString(), let target = r.cString() else { return .failure(.invalid) }
            return make(in: node, name) { dir, name in ConfinedFiles.makeSymlink(dir, name, target: target) }
        case .mkdir:
            guard let mode = r.u32(), let umask = r.u32(), let name = r.cString() else { return .failure(.invalid) }
            return make(in: node, name) { dir, name in ConfinedFiles.makeDirectory(dir, name, mode: Self.safeMode(mode & ~umask)) }
        case .mknod:
            return .failure(.notPermitted) // devices, FIFOs and sockets stay off shared directories
        case .unlink, .rmdir:
            guard let name = r.cString() else { return .failure(.invalid) }
            return writableDirectory(node).flatMap { dir in
                checked(name).flatMap { ConfinedFiles.remove(dir.file!.rawValue, $0, isDirectory: opcode == .rmdir) }
            }.map { [] }
        case .rename, .rename2:
            guard let newParent = r.u64() else { return .failure(.invalid) }
            var flags: UInt32 = 0
            if opcode == .rename2 { guard let f = r.u32(), r.skip(4) else { return .failure(.invalid) }; flags = f }
            guard let oldName = r.cString(), let newName = r.cString() else { return .failure(.invalid) }
            return rename(node, oldName, newParent, newName, flags: flags)
        case .link:
            guard let target = r.u64(), let name = r.cString() else { return .failure(.invalid) }
            return link(target, into: node, name)
        case .open, .opendir:
            guard let flags = r.u32() else { return .failure(.invalid) }
            return open(node, flags: Int32(bitPattern: flags), directory: opcode == .opendir)
        case .create:
            guard let flags = r.u32(), let mode = r.u32(), let umask = r.u32(), r.skip(4), let name = r.cString() else {
                return .failure(.invalid)
            }
            return create(in: node, name, flags: Int32(bitPattern: flags), mode: Self.safeMode(mode & ~umask))
        case .read:
            guard let fh = r.u64(), let offset = r.u64(), let size = r.u32() else { return .failure(.invalid) }
            return read(fh, offset: offset, size: min(Int(size), Self.maximumTransfer, max(replyLimit, 0)))
        case .write:
            guard let fh = r.u64(), let offset = r.u64(), let size = r.u32(), r.skip(4 + 8 + 4 + 4),
                  Int(size) <= Self.maximumTransfer, r.remaining >= Int(size) else { return .failure(.invalid) }
            return write(fh, offset: offset, data: r.rest().prefix(Int(size)))
        case .release, .releasedir:
            guard let fh = r.u64() else { return .failure(.invalid) }
            return release(fh, directory: opcode == .releasedir)
        case .flush:
            guard let fh = r.u64() else { return .failure(.invalid) }
            return handle(fh).map { _ in [] }
        case .fsync, .fsyncdir:
            guard let fh = r.u64(), let flags = r.u32() else { return .failure(.invalid) }
            return handle(fh).flatMap { ConfinedFiles.sync($0.file.rawValue, dataOnly: flags & 1 != 0) }.map { [] }
        case .readdir, .readdirplus:
            guard let fh = r.u64(), let offset = r.u64(), let size = r.u32() else { return .failure(.invalid) }
            return readDirectory(fh, offset: offset, size: min(Int(size), max(replyLimit, 0)), plus: opcode == .readdirplus)
        case .statfs:
            return fileSystemStatus(node)
        case .getxattr:
            guard let size = r.u32(), r.skip(4), let name = r.cString() else { return .failure(.invalid) }
            return getAttribute(node, name, size: min(Int(size), 64 << 10, max(replyLimit, 0)))
        case .listxattr:
            guard let size = r.u32() else { return .failure(.invalid) }
            return listAttributes(node, size: min(Int(size), 64 << 10, max(replyLimit, 0)))
        case .setxattr:
            guard let size = r.u32(), let flags = r.u32(), let name = r.cString(), size <= 64 << 10, r.remaining >= Int(size) else {
                return .failure(.invalid)
            }
            let value = Array(r.rest().prefix(Int(size)))
            return changeAttribute(node, name) { fd, name in ConfinedFiles.setAttribute(fd, name, value: value, flags: Int32(bitPattern: flags)) }
        case .removexattr:
            guard let name = r.cString() else { return .failure(.invalid) }
            return changeAttribute(node, name) { fd, name in ConfinedFiles.removeAttribute(fd, name) }
        case .fallocate:
            guard let fh = r.u64(), let offset = r.u64(), let length = r.u64(), let mode = r.u32() else { return .failure(.invalid) }
            return writableHandle(fh).flatMap {
                ConfinedFiles.allocate($0.file.rawValue, mode: Int32(bitPattern: mode), offset: offset, length: length)
            }.map { [] }
        case .lseek:
            guard let fh = r.u64(), let offset = r.u64(), let whence = r.u32() else { return .failure(.invalid) }
            return handle(fh).flatMap { ConfinedFiles.seek($0.file.rawValue, offset: offset, whence: Int32(bitPattern: whence)) }
                .map { LittleEndian.bytes($0, 8) }
        default:
            // access (the guest checks permissions itself), locks (the guest's kernel keeps them
            // locally), ioctl, poll, bmap, copy_file_range, syncfs, interrupt: not served.
            return .failure(FileErrno(ENOSYS))
        }
    }

    // MARK: INIT

    private func initialize(_ r: inout FuseReader) -> Result<[UInt8], FileErrno> {
        guard let major = r.u32(), let minor = r.u32(), let readahead = r.u32(), let flags = r.u32() else { return .failure(.invalid) }
        guard major == Fuse.major, minor >= Fuse.minimumMinor else { return .failure(FileErrno(EPROTO)) }
        reset()
        state.withLock { $0.initialized = true }
        let wanted = Fuse.InitFlag.asyncRead | Fuse.InitFlag.atomicTruncate | Fuse.InitFlag.bigWrites | Fuse.InitFlag.doReaddirplus
            | Fuse.InitFlag.readdirplusAuto | Fuse.InitFlag.parallelDirops | Fuse.InitFlag.maxPages
        var w = FuseWriter()
        w.u32(Fuse.major); w.u32(min(minor, Fuse.minor)); w.u32(readahead); w.u32(flags & wanted)
        w.u16(16); w.u16(12) // max_background, congestion_threshold
        w.u32(UInt32(Self.maximumTransfer)); w.u32(1) // max_write, time_gran (nanoseconds)
        w.u16(Self.maximumPages); w.u16(0); w.u32(0) // max_pages, map_alignment, flags2
        w.zeros(28)
        return .success(w.bytes)
    }

    /// Forgets every node and handle (INIT again, DESTROY, a device reset).
    public func reset() { replaceTables(with: State()) }

    /// Puts `tables` in place of the server's; the old tables' descriptors close as they go,
    /// outside the lock.
    func replaceTables(with tables: State) {
        let old = state.withLock { s -> State in
            defer { s = tables }
            return s
        }
        _ = old
    }

    // MARK: nodes

    private func forget(_ node: UInt64, _ count: UInt64) {
        let gone = state.withLock { s -> Node? in
            guard node != Fuse.rootNode, var n = s.nodes[node] else { return nil }
            n.lookups = n.lookups > count ? n.lookups - count : 0
            guard n.lookups == 0 else { s.nodes[node] = n; return nil }
            s.nodes[node] = nil
            if s.byKey[n.key] == node { s.byKey[n.key] = nil }
            return n
        }
        _ = gone
    }

    /// A held node: the server's root has no descriptor (nil `file`).
    private func node(_ id: UInt64) -> Result<Node, FileErrno> {
        if id == Fuse.rootNode { return .success(Node(file: nil, volume: nil, key: FileKey(device: 0, inode: 0), lookups: 1)) }
        return state.withLock { $0.nodes[id] }.map { .success($0) } ?? .failure(FileErrno(ESTALE))
    }

    /// A node of a volume (not the server's root).
    private func file(_ id: UInt64) -> Result<Node, FileErrno> {
        node(id).flatMap { $0.file == nil ? .failure(.notPermitted) : .success($0) }
    }

    private func isReadOnly(_ n: Node) -> Bool { n.volume.map { volumes[$0].readOnly } ?? true }

    /// A directory of a volume the guest may change.
    private func writableDirectory(_ id: UInt64) -> Result<Node, FileErrno> {
        node(id).flatMap { n in
            guard n.file != nil, !isReadOnly(n) else { return .failure(.readOnly) }
            return .success(n)
        }
    }

    private func checked(_ name: [UInt8]) -> Result<String, FileErrno> { ConfinedFiles.checkName(name) }

    /// Looks `name` up in `parent` and counts one more lookup of the node it finds.
    private func lookup(_ parent: UInt64, _ name: [UInt8]) -> Result<(UInt64, stat), FileErrno> {
        node(parent).flatMap { p in
            checked(name).flatMap { name in
                guard let dir = p.file else {
                    // The server's root: the volumes.
                    guard let index = volumes.indices.first(where: { Self.volumeName($0) == name }) else { return .failure(.noEntry) }
                    return remember(volumes[index].root, volume: index)
                }
                return ConfinedFiles.lookup(dir.rawValue, name).flatMap { remember($0, volume: p.volume!) }
            }
        }
    }

    /// Takes a looked-up file as a node (the one already held for the same file, if any).
    private func remember(_ file: SharedDescriptor, volume: Int) -> Result<(UInt64, stat), FileErrno> {
        ConfinedFiles.status(file.rawValue).flatMap { st in
            let key = FileKey(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
            return state.withLock { s -> Result<(UInt64, stat), FileErrno> in
                if let id = s.byKey[key], var n = s.nodes[id], n.volume == volume {
                    n.lookups += 1
                    s.nodes[id] = n
                    return .success((id, st))
                }
                guard s.nodes.count < limits.nodes else { return .failure(FileErrno(ENFILE)) }
                let id = s.nextNode
                s.nextNode += 1
                s.nodes[id] = Node(file: file, volume: volume, key: key, lookups: 1)
                s.byKey[key] = id
                return .success((id, st))
            }
        }
    }

    private func attributes(of id: UInt64) -> Result<stat, FileErrno> {
        node(id).flatMap { n in
            guard let file = n.file else { return .success(rootStatus) }
            return ConfinedFiles.status(file.rawValue)
        }
    }

    /// The server's root: a read-only directory holding the volumes.
    private var rootStatus: stat {
        var st = stat()
        st.st_ino = 1
        st.st_mode = S_IFDIR | 0o555
        st.st_nlink = 2 + UInt(volumes.count)
        st.st_uid = hostUID
        st.st_gid = hostGID
        st.st_blksize = 4096
        return st
    }

    /// A file's inode number in the guest: its host number, with its device mixed in when it is
    /// not the first volume's (two file systems may use the same numbers). The server's root
    /// (device 0, inode 1) mixes in nothing and stays 1.
    private func guestInode(_ st: stat) -> UInt64 {
        let device = UInt64(st.st_dev)
        guard let first = volumes.first?.device, device != first else { return UInt64(st.st_ino) }
        return UInt64(st.st_ino) ^ (device &* 0x9E37_79B9_7F4A_7C15 & 0xFFFF_0000_0000_0000)
    }

    private func guestID(_ host: UInt32, own: UInt32) -> UInt32 {
        if host == own { return Self.guestRoot }
        return host == 0 ? Self.nobody : host
    }

    private func hostID(_ guest: UInt32, own: UInt32) -> UInt32 {
        if guest == Self.guestRoot { return own }
        return guest == Self.nobody && own != 0 ? 0 : guest
    }

    private func writeAttributes(_ st: stat, to w: inout FuseWriter) {
        FuseAttributes(inode: guestInode(st), size: UInt64(max(st.st_size, 0)), blocks: UInt64(max(st.st_blocks, 0)),
                       atime: (UInt64(bitPattern: Int64(st.st_atim.tv_sec)), UInt32(st.st_atim.tv_nsec)),
                       mtime: (UInt64(bitPattern: Int64(st.st_mtim.tv_sec)), UInt32(st.st_mtim.tv_nsec)),
                       ctime: (UInt64(bitPattern: Int64(st.st_ctim.tv_sec)), UInt32(st.st_ctim.tv_nsec)),
                       mode: st.st_mode, links: UInt32(truncatingIfNeeded: st.st_nlink),
                       uid: guestID(st.st_uid, own: hostUID), gid: guestID(st.st_gid, own: hostGID),
                       rdev: UInt32(truncatingIfNeeded: st.st_rdev), blockSize: UInt32(truncatingIfNeeded: st.st_blksize))
            .write(to: &w)
    }

    private func entryBytes(_ entry: (UInt64, stat)) -> [UInt8] {
        var w = FuseWriter()
        writeEntry(entry.0, entry.1, to: &w)
        return w.bytes
    }

    /// struct fuse_entry_out (128 bytes).
    private func writeEntry(_ id: UInt64, _ st: stat, to w: inout FuseWriter) {
        w.u64(id); w.u64(0) // nodeid, generation (ids are never reused)
        w.u64(Self.cacheSeconds); w.u64(Self.cacheSeconds); w.u32(0); w.u32(0)
        writeAttributes(st, to: &w)
    }

    /// struct fuse_attr_out (104 bytes).
    private func attributeBytes(_ st: stat) -> [UInt8] {
        var w = FuseWriter()
        w.u64(Self.cacheSeconds); w.u32(0); w.u32(0)
        writeAttributes(st, to: &w)
        return w.bytes
    }

    /// No set-user-ID or set-group-ID bit on a host file the guest makes or changes.
    static func safeMode(_ mode: UInt32) -> UInt32 { mode & 0o1777 }

    // MARK: changes

    /// Makes `name` in `parent` with `make`, then looks it up (the reply is its entry).
    private func make(in parent: UInt64, _ name: [UInt8], _ make: (Int32, String) -> Result<Void, FileErrno>) -> Result<[UInt8], FileErrno> {
        writableDirectory(parent).flatMap { dir in
            checked(name).flatMap { checkedName in
                make(dir.file!.rawValue, checkedName).flatMap { lookup(parent, name).map(entryBytes) }
            }
        }
    }

    private func rename(_ parent: UInt64, _ oldName: [UInt8], _ newParent: UInt64, _ newName: [UInt8], flags: UInt32) -> Result<[UInt8], FileErrno> {
        writableDirectory(parent).flatMap { from in
            writableDirectory(newParent).flatMap { to in
                guard from.volume == to.volume else { return .failure(FileErrno(EXDEV)) }
                return checked(oldName).flatMap { old in
                    checked(newName).flatMap { new in ConfinedFiles.rename(from.file!.rawValue, old, to: to.file!.rawValue, new, flags: flags) }
                }
            }
        }.map { [] }
    }

    private func link(_ target: UInt64, into parent: UInt64, _ name: [UInt8]) -> Result<[UInt8], FileErrno> {
        file(target).flatMap { t in
            writableDirectory(parent).flatMap { dir in
                guard t.volume == dir.volume else { return .failure(FileErrno(EXDEV)) }
                return checked(name).flatMap { ConfinedFiles.link(t.file!.rawValue, to: dir.file!.rawValue, $0) }
                    .flatMap { lookup(parent, name).map(entryBytes) }
            }
        }
    }

    private func setAttributes(_ id: UInt64, _ r: inout FuseReader) -> Result<[UInt8], FileErrno> {
        let start = r.position
        guard r.remaining >= 88, let valid = r.u32() else { return .failure(.invalid) }
        func field32(_ offset: Int) -> UInt32 { UInt32(LittleEndian.read(r.bytes, at: start + offset, count: 4)) }
        func field64(_ offset: Int) -> UInt64 { LittleEndian.read(r.bytes, at: start + offset, count: 8) }
        return file(id).flatMap { n -> Result<stat, FileErrno> in
            guard !isReadOnly(n) else { return .failure(.readOnly) }
            let fd = n.file!.rawValue
            if valid & Fuse.SetattrValid.mode != 0 {
                if case .failure(let e) = ConfinedFiles.changeMode(fd, Self.safeMode(field32(68))) { return .failure(e) }
            }
            if valid & (Fuse.SetattrValid.uid | Fuse.SetattrValid.gid) != 0 {
                let uid = valid & Fuse.SetattrValid.uid != 0 ? hostID(field32(76), own: hostUID) : nil
                let gid = valid & Fuse.SetattrValid.gid != 0 ? hostID(field32(80), own: hostGID) : nil
                if case .failure(let e) = ConfinedFiles.changeOwner(fd, uid: uid, gid: gid) { return .failure(e) }
            }
            if valid & Fuse.SetattrValid.size != 0 {
                let size = field64(16)
                guard size <= UInt64(Int64.max) else { return .failure(FileErrno(EFBIG)) }
                if case .failure(let e) = ConfinedFiles.truncate(fd, to: Int64(size)) { return .failure(e) }
            }
            if valid & (Fuse.SetattrValid.atime | Fuse.SetattrValid.mtime) != 0 {
                func time(_ set: UInt32, _ now: UInt32, _ seconds: Int, _ nanoseconds: Int) -> ConfinedFiles.Time {
                    guard valid & set != 0 else { return .leave }
                    if valid & now != 0 { return .now }
                    return .at(seconds: Int64(bitPattern: field64(seconds)), nanoseconds: field32(nanoseconds))
                }
                let access = time(Fuse.SetattrValid.atime, Fuse.SetattrValid.atimeNow, 32, 56)
                let modification = time(Fuse.SetattrValid.mtime, Fuse.SetattrValid.mtimeNow, 40, 60)
                if case .failure(let e) = ConfinedFiles.setTimes(fd, access: access, modification: modification) { return .failure(e) }
            }
            return ConfinedFiles.status(fd)
        }.map(attributeBytes)
    }

    private func changeAttribute(_ id: UInt64, _ name: [UInt8], _ change: (Int32, String) -> Result<Void, FileErrno>) -> Result<[UInt8], FileErrno> {
        file(id).flatMap { n in
            guard !isReadOnly(n) else { return .failure(.readOnly) }
            // Only the user namespace: security.* (file capabilities), trusted.* and ACLs stay the host's.
            guard name.starts(with: Array("user.".utf8)), name.count <= 255, !name.contains(0) else { return .failure(.notPermitted) }
            return change(n.file!.rawValue, String(decoding: name, as: UTF8.self))
        }.map { [] }
    }

    // MARK: handles

    private func addHandle(_ h: Handle) -> Result<UInt64, FileErrno> {
        state.withLock { s in
            guard s.handles.count < limits.handles else { return .failure(FileErrno(ENFILE)) }
            let fh = s.nextHandle
            s.nextHandle += 1
            s.handles[fh] = h
            return .success(fh)
        }
    }

    private func handle(_ fh: UInt64) -> Result<Handle, FileErrno> {
        state.withLock { $0.handles[fh] }.map { .success($0) } ?? .failure(.badHandle)
    }

    private func writableHandle(_ fh: UInt64) -> Result<Handle, FileErrno> {
        handle(fh).flatMap { $0.writable ? .success($0) : .failure(.badHandle) }
    }

    /// struct fuse_open_out: the handle, and for a file opened write-only, direct I/O: its
    /// writes go to the server from the writer's own pages, without a copy into the guest's page
    /// cache first (which a write-only descriptor can neither read back nor map).
    private static func openBytes(_ fh: UInt64, flags: Int32) -> [UInt8] {
        var w = FuseWriter()
        w.u64(fh); w.u32(flags & O_ACCMODE == O_WRONLY ? Fuse.OpenFlag.directIO : 0); w.u32(0)
        return w.bytes
    }

    /// The flags a guest's open may pass on to the host: access mode, append, truncate, sync.
    static func hostOpenFlags(_ flags: Int32) -> Int32 {
        flags & (O_ACCMODE | O_APPEND | O_TRUNC | O_SYNC | O_DSYNC | O_NONBLOCK)
    }

    private func open(_ id: UInt64, flags: Int32, directory: Bool) -> Result<[UInt8], FileErrno> {
        node(id).flatMap { n in
            let hostFlags = Self.hostOpenFlags(flags)
            let writes = hostFlags & O_ACCMODE != O_RDONLY || hostFlags & O_TRUNC != 0
            guard let file = n.file else {
                // The server's root: only listed.
                guard directory, !writes else { return .failure(.readOnly) }
                return addHandle(Handle(file: SharedDescriptor(taking: -1), node: id, volume: nil, directory: true, flags: O_RDONLY))
                    .map { Self.openBytes($0, flags: O_RDONLY) }
            }
            if writes && isReadOnly(n) { return .failure(.readOnly) }
            let opened = directory ? ConfinedFiles.reopen(file.rawValue, flags: O_RDONLY | O_DIRECTORY)
                : ConfinedFiles.reopen(file.rawValue, flags: hostFlags)
            return opened.flatMap { fd in
                addHandle(Handle(file: fd, node: id, volume: n.volume, directory: directory,
                                 flags: directory ? O_RDONLY | O_DIRECTORY : hostFlags & ~O_TRUNC))
            }.map { Self.openBytes($0, flags: directory ? O_RDONLY : hostFlags) }
        }
    }

    private func create(in parent: UInt64, _ name: [UInt8], flags: Int32, mode: UInt32) -> Result<[UInt8], FileErrno> {
        writableDirectory(parent).flatMap { dir in
            checked(name).flatMap { checkedName in
                let hostFlags = Self.hostOpenFlags(flags) | (flags & O_EXCL)
                return ConfinedFiles.create(dir.file!.rawValue, checkedName, flags: hostFlags, mode: mode).flatMap { opened in
                    lookup(parent, name).flatMap { entry in
                        addHandle(Handle(file: opened, node: entry.0, volume: dir.volume, directory: false, flags: hostFlags & ~(O_TRUNC | O_EXCL)))
                            .map { entryBytes(entry) + Self.openBytes($0, flags: hostFlags) }
                            .mapError { e in forget(entry.0, 1); return e }
                    }
                }
            }
        }
    }

    private func release(_ fh: UInt64, directory: Bool) -> Result<[UInt8], FileErrno> {
        let gone = state.withLock { s -> Handle? in
            guard let h = s.handles[fh], h.directory == directory else { return nil }
            s.handles[fh] = nil
            return h
        }
        return gone == nil ? .failure(.badHandle) : .success([])
    }

    private func read(_ fh: UInt64, offset: UInt64, size: Int) -> Result<[UInt8], FileErrno> {
        var data = [UInt8](repeating: 0, count: size)
        let result = data.withUnsafeMutableBytes { read(fh, offset: offset, into: [$0]) }
        return result.map { Array(data.prefix($0)) }
    }

    private func write(_ fh: UInt64, offset: UInt64, data: ArraySlice<UInt8>) -> Result<[UInt8], FileErrno> {
        data.withUnsafeBytes { write(fh, offset: offset, from: [$0]) }.map(Self.writeBytes)
    }

    /// struct fuse_write_out.
    static func writeBytes(_ count: Int) -> [UInt8] {
        var w = FuseWriter()
        w.u32(UInt32(count)); w.u32(0)
        return w.bytes
    }

    /// READ's data straight into `buffers` (the reply's data part, in guest memory): how many
    /// bytes were read.
    public func read(_ fh: UInt64, offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer]) -> Result<Int, FileErrno> {
        guard state.withLock({ $0.initialized }) else { return .failure(FileErrno(EIO)) }
        return handle(fh).flatMap { h in
            guard !h.directory else { return .failure(FileErrno(EISDIR)) }
            guard offset <= UInt64(Int64.max) else { return .failure(.invalid) }
            return ConfinedFiles.read(h.file.rawValue, into: buffers, at: offset)
        }
    }

    /// WRITE's data straight from `buffers` (the request's data part, in guest memory).
    public func write(_ fh: UInt64, offset: UInt64, from buffers: [UnsafeRawBufferPointer]) -> Result<Int, FileErrno> {
        guard state.withLock({ $0.initialized }) else { return .failure(FileErrno(EIO)) }
        let count = buffers.reduce(0) { $0 + $1.count }
        return writableHandle(fh).flatMap { h in
            guard offset <= UInt64(Int64.max), offset &+ UInt64(count) >= offset, count <= Self.maximumTransfer else {
                return .failure(FileErrno(EFBIG))
            }
            return ConfinedFiles.write(h.file.rawValue, from: buffers, at: offset)
        }
    }

    /// A reply's header (struct fuse_out_header): `length` bytes in all, or an error.
    static func replyHeader(unique: UInt64, result: Result<Int, FileErrno>) -> [UInt8] {
        var w = FuseWriter()
        switch result {
        case .success(let length): w.u32(UInt32(length)); w.u32(0)
        case .failure(let e): w.u32(UInt32(Fuse.outHeaderSize)); w.u32(UInt32(bitPattern: -e.rawValue))
        }
        w.u64(unique)
        return w.bytes
    }

    // MARK: directories

    /// READDIR(PLUS) of an open directory; READDIRPLUS looks each entry up in the directory the
    /// handle is of (whatever node the request names).
    private func readDirectory(_ fh: UInt64, offset: UInt64, size: Int, plus: Bool) -> Result<[UInt8], FileErrno> {
        handle(fh).flatMap { h -> Result<[UInt8], FileErrno> in
            guard h.directory else { return .failure(.notDirectory) }
            let id = h.node
            let entries: [ConfinedFiles.DirectoryEntry]
            if h.file.rawValue < 0 {
                // The server's root: ".", "..", then the volumes; offsets count entries.
                let names = [".", ".."] + volumes.indices.map(Self.volumeName)
                entries = names.enumerated().dropFirst(Int(min(offset, UInt64(names.count)))).map { i, name in
                    ConfinedFiles.DirectoryEntry(inode: i < 2 ? 1 : 2 + UInt64(i), offset: UInt64(i + 1), type: 4 /* DT_DIR */,
                                                 name: Array(name.utf8))
                }
            } else {
                switch ConfinedFiles.readDirectory(h.file.rawValue, from: offset, bufferSize: min(max(size * 2, 4096), 64 << 10)) {
                case .success(let e): entries = e
                case .failure(let e): return .failure(e)
                }
            }
            var w = FuseWriter()
            for entry in entries {
                let direntSize = 24 + (entry.name.count + 7) / 8 * 8
                let needed = (plus ? 128 : 0) + direntSize
                guard w.bytes.count + needed <= size else { break }
                var inode = entry.inode
                if plus {
                    let dots = entry.name == [0x2E] || entry.name == [0x2E, 0x2E]
                    if dots {
                        w.zeros(128) // no entry for . and .. (node 0: the guest skips it)
                    } else {
                        switch lookup(id, entry.name) {
                        case .success(let (child, st)):
                            writeEntry(child, st, to: &w)
                            inode = guestInode(st)
                        case .failure(let e) where e == FileErrno(ENFILE):
                            // Out of nodes: end this batch (nothing written for this entry).
                            return w.bytes.isEmpty ? .failure(e) : .success(w.bytes)
                        case .failure:
                            w.zeros(128) // gone meanwhile or not reachable: listed without an entry
                        }
                    }
                }
                w.u64(inode); w.u64(entry.offset); w.u32(UInt32(entry.name.count)); w.u32(UInt32(entry.type))
                w.bytes += entry.name
                w.pad8()
            }
            return .success(w.bytes)
        }
    }

    private func fileSystemStatus(_ id: UInt64) -> Result<[UInt8], FileErrno> {
        node(id).flatMap { n -> Result<statfs, FileErrno> in
            let fd = n.file?.rawValue ?? volumes.first?.root.rawValue
            guard let fd else { return .success(statfs()) }
            return ConfinedFiles.fileSystemStatus(fd)
        }.map { (st: statfs) -> [UInt8] in
            var w = FuseWriter()
            w.u64(UInt64(st.f_blocks)); w.u64(UInt64(st.f_bfree)); w.u64(UInt64(st.f_bavail))
            w.u64(UInt64(st.f_files)); w.u64(UInt64(st.f_ffree))
            w.u32(UInt32(truncatingIfNeeded: st.f_bsize)); w.u32(UInt32(truncatingIfNeeded: st.f_namelen))
            w.u32(UInt32(truncatingIfNeeded: st.f_frsize)); w.u32(0)
            w.zeros(24)
            return w.bytes
        }
    }

    // MARK: extended attributes

    /// A reply to GETXATTR/LISTXATTR: with size 0 the length (fuse_getxattr_out), else the data.
    private static func attributeReply(_ result: Result<[UInt8], FileErrno>, size: Int) -> Result<[UInt8], FileErrno> {
        result.map { data in
            guard size == 0 else { return data }
            var w = FuseWriter()
            w.u32(UInt32(data.count)); w.u32(0)
            return w.bytes
        }
    }

    private func getAttribute(_ id: UInt64, _ name: [UInt8], size: Int) -> Result<[UInt8], FileErrno> {
        guard !name.isEmpty, name.count <= 255 else { return .failure(.invalid) }
        return Self.attributeReply(file(id).flatMap { ConfinedFiles.getAttribute($0.file!.rawValue, String(decoding: name, as: UTF8.self), size: size) },
                                   size: size)
    }

    private func listAttributes(_ id: UInt64, size: Int) -> Result<[UInt8], FileErrno> {
        Self.attributeReply(file(id).flatMap { ConfinedFiles.listAttributes($0.file!.rawValue, size: size) }, size: size)
    }
}
