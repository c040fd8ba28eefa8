import CLinux
import Glibc

/// An errno from a file operation done for someone else (a guest's file system request), to be
/// passed back to them as it is.
public struct FileErrno: Error, Equatable, Sendable {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    static var current: FileErrno { FileErrno(errno) }

    public static let notPermitted = FileErrno(EPERM)
    public static let noEntry = FileErrno(ENOENT)
    public static let invalid = FileErrno(EINVAL)
    public static let readOnly = FileErrno(EROFS)
    public static let notSupported = FileErrno(EOPNOTSUPP)
    public static let tooManyOpen = FileErrno(EMFILE)
    public static let badHandle = FileErrno(EBADF)
    public static let nameTooLong = FileErrno(ENAMETOOLONG)
    public static let notDirectory = FileErrno(ENOTDIR)
}

/// A descriptor owned by a reference (the file server's tables keep them): closed when the last
/// reference goes.
public final class SharedDescriptor: Sendable {
    public let rawValue: Int32
    public init(taking rawValue: Int32) { self.rawValue = rawValue }
    deinit { Glibc.close(rawValue) }
}

/// File operations beneath a directory the caller holds as a descriptor, for a file server that
/// serves a host directory to a guest (virtio-fs). Nothing here takes a path from outside and
/// resolves it: names are single components checked by `checkName`, resolved with openat2
/// (RESOLVE_BENEATH, no symlinks, no magic links), and files are held as SWIFTLET_O_PATH descriptors
/// opened with O_NOFOLLOW, so a symlink in the shared tree is never followed on the host. An
/// operation on a held file goes through `/proc/self/fd/N` only for a regular file or a
/// directory (never for a symlink, which that path would follow).
public enum ConfinedFiles {
    /// `name` as one path component: not empty, no `/` or NUL, not `.` or `..`, at most 255 bytes.
    public static func checkName(_ name: [UInt8]) -> Result<String, FileErrno> {
        guard !name.isEmpty, name != [0x2E], name != [0x2E, 0x2E], !name.contains(0x2F), !name.contains(0) else {
            return .failure(.invalid)
        }
        guard name.count <= 255 else { return .failure(.nameTooLong) }
        return .success(String(decoding: name, as: UTF8.self))
    }

    static let resolve = SWIFTLET_RESOLVE_BENEATH | SWIFTLET_RESOLVE_NO_MAGICLINKS | SWIFTLET_RESOLVE_NO_SYMLINKS

    /// The directory at `path` (given by the host's user, not the guest), as an SWIFTLET_O_PATH descriptor.
    public static func openRoot(_ path: String) throws(SwiftletError) -> SharedDescriptor {
        let fd = swiftlet_open(path, SWIFTLET_O_PATH | O_DIRECTORY | O_CLOEXEC, 0)
        guard fd >= 0 else { throw SwiftletError.system("cannot open the directory \(path)", errno: currentErrno) }
        return SharedDescriptor(taking: fd)
    }

    /// The entry `name` of `directory` as an SWIFTLET_O_PATH descriptor of the entry itself (a symlink is
    /// not followed).
    public static func lookup(_ directory: Int32, _ name: String) -> Result<SharedDescriptor, FileErrno> {
        let fd = swiftlet_openat2(directory, name, UInt64(SWIFTLET_O_PATH | O_NOFOLLOW | O_CLOEXEC), 0, resolve)
        return fd >= 0 ? .success(SharedDescriptor(taking: fd)) : .failure(.current)
    }

    /// The file at `names` (single components, each checked by `checkName`) beneath
    /// `directory`, as an SWIFTLET_O_PATH descriptor: one openat2 that stays beneath the directory and
    /// follows no symlink on the way (a symlink as the last name is the symlink itself). No names:
    /// the directory again.
    public static func lookup(_ directory: Int32, path names: [[UInt8]]) -> Result<SharedDescriptor, FileErrno> {
        var path: [UInt8] = names.isEmpty ? [0x2E] : []
        for name in names {
            if case .failure(let e) = checkName(name) { return .failure(e) }
            if !path.isEmpty { path.append(0x2F) }
            path += name
        }
        guard path.count < 4096 else { return .failure(.nameTooLong) }
        path.append(0)
        let fd = path.withUnsafeBufferPointer { bytes in
            bytes.withMemoryRebound(to: CChar.self) {
                swiftlet_openat2(directory, $0.baseAddress, UInt64(SWIFTLET_O_PATH | O_NOFOLLOW | O_CLOEXEC), 0, resolve)
            }
        }
        return fd >= 0 ? .success(SharedDescriptor(taking: fd)) : .failure(.current)
    }

    /// Where a held file is now, as the host's kernel names it (`/proc/self/fd`): its path from
    /// the root, or nil when it has no name any more (removed) or the kernel cannot say.
    /// For saving which file a descriptor is, never for opening it by that path.
    public static func currentPath(_ fd: Int32) -> [UInt8]? {
        guard case .success(let st) = status(fd), st.st_nlink > 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4097)
        let n = buffer.withUnsafeMutableBytes { readlink(procPath(fd), $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
        guard n > 0, n < buffer.count, buffer[0] == 0x2F else { return nil }
        return Array(buffer.prefix(n))
    }

    /// lstat of a held file.
    public static func status(_ fd: Int32) -> Result<stat, FileErrno> {
        var st = stat()
        return fstatat(fd, "", &st, SWIFTLET_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0 ? .success(st) : .failure(.current)
    }

    static func procPath(_ fd: Int32) -> String { "/proc/self/fd/\(fd)" }

    /// `body` with the `/proc/self/fd` path of a held file, only when that path may be followed
    /// (the file is a regular file or a directory, never a symlink).
    static func throughProc<T>(_ fd: Int32, _ body: (String) -> Result<T, FileErrno>) -> Result<T, FileErrno> {
        status(fd).flatMap { st in
            let type = st.st_mode & S_IFMT
            return type == S_IFREG || type == S_IFDIR ? body(procPath(fd)) : .failure(.invalid)
        }
    }

    /// A held regular file or directory opened for I/O with `flags` (O_CREAT, O_NOFOLLOW-free
    /// reopening through /proc/self/fd; O_CREAT and O_EXCL are dropped).
    public static func reopen(_ fd: Int32, flags: Int32) -> Result<SharedDescriptor, FileErrno> {
        throughProc(fd) { path in
            let opened = swiftlet_open(path, (flags & ~(O_CREAT | O_EXCL | O_NOCTTY)) | O_CLOEXEC, 0)
            return opened >= 0 ? .success(SharedDescriptor(taking: opened)) : .failure(.current)
        }
    }

    /// Creates the regular file `name` in `directory` (O_EXCL unless `exclusive` is false) and
    /// opens it with `flags`.
    public static func create(_ directory: Int32, _ name: String, flags: Int32, mode: UInt32) -> Result<SharedDescriptor, FileErrno> {
        let fd = swiftlet_openat2(directory, name, UInt64((flags & ~O_NOCTTY) | O_CREAT | O_NOFOLLOW | O_CLOEXEC), UInt64(mode & 0o7777), resolve)
        return fd >= 0 ? .success(SharedDescriptor(taking: fd)) : .failure(.current)
    }

    static func check(_ result: Int32) -> Result<Void, FileErrno> { result == 0 ? .success(()) : .failure(.current) }

    public static func makeDirectory(_ directory: Int32, _ name: String, mode: UInt32) -> Result<Void, FileErrno> {
        check(mkdirat(directory, name, mode_t(mode & 0o7777)))
    }

    public static func makeSymlink(_ directory: Int32, _ name: String, target: [UInt8]) -> Result<Void, FileErrno> {
        guard !target.isEmpty, target.count < 4096, !target.contains(0) else { return .failure(.invalid) }
        return check(symlinkat(String(decoding: target, as: UTF8.self), directory, name))
    }

    /// What a held symlink points to (never followed here).
    public static func readLink(_ fd: Int32) -> Result<[UInt8], FileErrno> {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { readlinkat(fd, "", $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
        return n >= 0 ? .success(Array(buffer.prefix(n))) : .failure(.current)
    }

    public static func remove(_ directory: Int32, _ name: String, isDirectory: Bool) -> Result<Void, FileErrno> {
        check(unlinkat(directory, name, isDirectory ? AT_REMOVEDIR : 0))
    }

    /// renameat2 with RENAME_NOREPLACE / RENAME_EXCHANGE as given (others refused).
    public static func rename(_ from: Int32, _ name: String, to: Int32, _ newName: String, flags: UInt32) -> Result<Void, FileErrno> {
        guard flags & ~UInt32(3) == 0 else { return .failure(.invalid) }
        return check(swiftlet_renameat2(from, name, to, newName, flags))
    }

    /// A new name `newName` in `directory` for a held regular file.
    public static func link(_ fd: Int32, to directory: Int32, _ newName: String) -> Result<Void, FileErrno> {
        switch status(fd) {
        case .success(let st) where st.st_mode & S_IFMT == S_IFREG: break
        case .success: return .failure(.notPermitted)
        case .failure(let e): return .failure(e)
        }
        return check(linkat(AT_FDCWD, procPath(fd), directory, newName, AT_SYMLINK_FOLLOW))
    }

    public static func changeMode(_ fd: Int32, _ mode: UInt32) -> Result<Void, FileErrno> {
        throughProc(fd) { check(fchmodat(AT_FDCWD, $0, mode_t(mode & 0o7777), 0)) }
    }

    public static func changeOwner(_ fd: Int32, uid: UInt32?, gid: UInt32?) -> Result<Void, FileErrno> {
        check(fchownat(fd, "", uid ?? UInt32.max, gid ?? UInt32.max, SWIFTLET_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
    }

    /// Truncates a held regular file (opened for writing to do it: the same permission check as
    /// truncate(2)).
    public static func truncate(_ fd: Int32, to size: Int64) -> Result<Void, FileErrno> {
        guard size >= 0 else { return .failure(.invalid) }
        return reopen(fd, flags: O_WRONLY).flatMap { check(ftruncate($0.rawValue, off_t(size))) }
    }

    /// Sets access and modification times (nil: leave; `now`: the current time).
    public enum Time: Sendable { case leave, now, at(seconds: Int64, nanoseconds: UInt32) }

    public static func setTimes(_ fd: Int32, access: Time, modification: Time) -> Result<Void, FileErrno> {
        func spec(_ t: Time) -> timespec {
            switch t {
            case .leave: return timespec(tv_sec: 0, tv_nsec: SWIFTLET_UTIME_OMIT)
            case .now: return timespec(tv_sec: 0, tv_nsec: SWIFTLET_UTIME_NOW)
            case .at(let s, let ns): return timespec(tv_sec: Int(s), tv_nsec: Int(min(ns, 999_999_999)))
            }
        }
        var times = [spec(access), spec(modification)]
        return throughProc(fd) { check(utimensat(AT_FDCWD, $0, &times, 0)) }
    }

    /// One directory entry as getdents64 gives it.
    public struct DirectoryEntry: Sendable {
        public var inode: UInt64
        public var offset: UInt64
        public var type: UInt8
        public var name: [UInt8]

        public init(inode: UInt64, offset: UInt64, type: UInt8, name: [UInt8]) {
            self.inode = inode; self.offset = offset; self.type = type; self.name = name
        }
    }

    /// Up to `bufferSize` bytes of entries of an opened directory from `offset` (as getdents64
    /// gave it before; 0: the start).
    public static func readDirectory(_ fd: Int32, from offset: UInt64, bufferSize: Int = 32 << 10) -> Result<[DirectoryEntry], FileErrno> {
        guard lseek(fd, off_t(Int64(bitPattern: offset)), SEEK_SET) >= 0 else { return .failure(.current) }
        var buffer = [UInt8](repeating: 0, count: bufferSize)
        let n = buffer.withUnsafeMutableBytes { swiftlet_getdents64(fd, $0.baseAddress, UInt($0.count)) }
        guard n >= 0 else { return .failure(.current) }
        var entries: [DirectoryEntry] = []
        var at = 0
        while at + 19 <= n {
            let length = Int(LittleEndian.read(buffer, at: at + 16, count: 2))
            guard length >= 19, at + length <= n else { break }
            let nameBytes = buffer[(at + 19)..<(at + length)]
            entries.append(DirectoryEntry(inode: LittleEndian.read(buffer, at: at, count: 8), offset: LittleEndian.read(buffer, at: at + 8, count: 8),
                                          type: buffer[at + 18], name: Array(nameBytes.prefix { $0 != 0 })))
            at += length
        }
        return .success(entries)
    }

    public static func fileSystemStatus(_ fd: Int32) -> Result<statfs, FileErrno> {
        var st = statfs()
        return fstatfs(fd, &st) == 0 ? .success(st) : .failure(.current)
    }

    /// preadv into `buffers` (a file server reads straight into guest memory), at most 1024 of them.
    public static func read(_ fd: Int32, into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) -> Result<Int, FileErrno> {
        guard buffers.count <= 1024 else { return .failure(.invalid) }
        let vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        let n = vectors.withUnsafeBufferPointer { preadv(fd, $0.baseAddress, Int32($0.count), off_t(Int64(bitPattern: offset))) }
        return n >= 0 ? .success(n) : .failure(.current)
    }

    /// pwritev from `buffers`, at most 1024 of them.
    public static func write(_ fd: Int32, from buffers: [UnsafeRawBufferPointer], at offset: UInt64) -> Result<Int, FileErrno> {
        guard buffers.count <= 1024 else { return .failure(.invalid) }
        let vectors = buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        let n = vectors.withUnsafeBufferPointer { pwritev(fd, $0.baseAddress, Int32($0.count), off_t(Int64(bitPattern: offset))) }
        return n >= 0 ? .success(n) : .failure(.current)
    }

    public static func sync(_ fd: Int32, dataOnly: Bool) -> Result<Void, FileErrno> {
        check(dataOnly ? fdatasync(fd) : fsync(fd))
    }

    public static func allocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Result<Void, FileErrno> {
        guard offset <= UInt64(Int64.max), length <= UInt64(Int64.max) else { return .failure(.invalid) }
        return check(swiftlet_fallocate(fd, mode, Int64(offset), Int64(length)))
    }

    public static func seek(_ fd: Int32, offset: UInt64, whence: Int32) -> Result<UInt64, FileErrno> {
        guard whence == SWIFTLET_SEEK_DATA || whence == SWIFTLET_SEEK_HOLE else { return .failure(.invalid) }
        let r = lseek(fd, off_t(Int64(bitPattern: offset)), whence)
        return r >= 0 ? .success(UInt64(r)) : .failure(.current)
    }

    // Extended attributes: of regular files and directories only (through /proc/self/fd).

    public static func getAttribute(_ fd: Int32, _ name: String, size: Int) -> Result<[UInt8], FileErrno> {
        throughProc(fd) { path in sized(size) { getxattr(path, name, $0.baseAddress, $0.count) } }
    }

    public static func listAttributes(_ fd: Int32, size: Int) -> Result<[UInt8], FileErrno> {
        throughProc(fd) { path in sized(size) { listxattr(path, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) } }
    }

    /// A get or list call into a buffer of `size` bytes; with size 0 it only tells the length,
    /// given back as that many zeros.
    static func sized(_ size: Int, _ call: (UnsafeMutableRawBufferPointer) -> Int) -> Result<[UInt8], FileErrno> {
        var buffer = [UInt8](repeating: 0, count: max(size, 0))
        let n = buffer.withUnsafeMutableBytes(call)
        guard n >= 0 else { return .failure(.current) }
        return .success(size == 0 ? [UInt8](repeating: 0, count: n) : Array(buffer.prefix(n)))
    }

    public static func setAttribute(_ fd: Int32, _ name: String, value: [UInt8], flags: Int32) -> Result<Void, FileErrno> {
        throughProc(fd) { path in check(value.withUnsafeBytes { setxattr(path, name, $0.baseAddress, $0.count, flags) }) }
    }

    public static func removeAttribute(_ fd: Int32, _ name: String) -> Result<Void, FileErrno> {
        throughProc(fd) { check(removexattr($0, name)) }
    }
}
