import CLinux
import Glibc
import SystemPackage

/// Sole owner of an open file descriptor; closes it when the owner goes away.
public struct OwnedFileDescriptor: ~Copyable, @unchecked Sendable {
    // SAFETY (Sendable): a file descriptor number is an integer; the kernel serialises operations on it.
    public let rawValue: Int32

    public init(taking rawValue: Int32) {
        precondition(rawValue >= 0, "invalid file descriptor")
        self.rawValue = rawValue
    }

    /// Opens `path` with `O_CLOEXEC` added to `flags`; `what` names the file in errors ("disk").
    public static func open(_ path: String, flags: Int32, mode: UInt32 = 0o644, what: String? = nil) throws(SwiftletError) -> OwnedFileDescriptor {
        let fd = try systemCall("cannot open \(what.map { $0 + " " } ?? "")\(path)") { swiftlet_open(path, flags, mode) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// A new descriptor (close-on-exec) for what `fd` refers to, owned by the caller.
    public static func duplicate(_ fd: Int32, what: String) throws(SwiftletError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try systemCall("cannot duplicate \(what) (descriptor \(fd))") { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
    }

    /// Creates a file in `directory` and unlinks it at once: scratch space that disappears with
    /// the descriptor (close-on-exec, like every descriptor Swiftlet opens).
    public static func unlinkedTemporaryFile(in directory: String, prefix: String) throws(SwiftletError) -> OwnedFileDescriptor {
        let file = try temporaryFile(in: directory, prefix: prefix)
        unlink(file.path)
        return file.take()
    }

    /// Creates a new file with a unique name (`prefix.XXXXXX`) in `directory`, for content that
    /// is renamed into place once complete. Returns the descriptor and the path.
    public static func temporaryFile(in directory: String, prefix: String) throws(SwiftletError) -> NamedFile {
        var template = Array((directory + "/" + prefix + ".XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { swiftlet_mkostemp($0.baseAddress!, O_CLOEXEC) }
        guard fd >= 0 else { throw SwiftletError.system("cannot create a file in \(directory)", errno: currentErrno) }
        return NamedFile(descriptor: OwnedFileDescriptor(taking: fd), path: template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
    }

    /// Opens an input file the user named, with an error that says which file, why, and `hint`.
    public static func openInput(_ path: String, role: String, hint: String? = nil) throws(SwiftletError) -> OwnedFileDescriptor {
        let fd = swiftlet_open(path, O_RDONLY, 0)
        guard fd >= 0 else {
            let error = SwiftletError.system("cannot open \(role) \(path)", errno: currentErrno)
            var message = "cannot open \(role) \(path): \(error.cause!.description)"
            if let hint { message += "; \(hint)" }
            throw SwiftletError(error.code, message, cause: error.cause)
        }
        let owned = OwnedFileDescriptor(taking: fd)
        guard try owned.isRegularFile() else { throw SwiftletError(.invalidFormat, "\(role) \(path) is not a regular file") }
        return owned
    }

    /// Opens the regular file at `path`, a path made from outside input (a snapshot's disk file):
    /// a symbolic link in its last component is refused (`O_NOFOLLOW`), and so is anything but a
    /// regular file (a device's size says nothing, and it may be a host disk). `what` names it in errors.
    public static func openRegularFile(_ path: String, flags: Int32, what: String) throws(SwiftletError) -> OwnedFileDescriptor {
        // O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a regular file.
        let fd = swiftlet_open(path, flags | O_NOFOLLOW | O_NONBLOCK, 0)
        guard fd >= 0 else {
            let failure = currentErrno
            if failure == .tooManySymbolicLinkLevels {
                throw SwiftletError(.invalidFormat, "\(what) \(path) is a symbolic link, which is refused: it must be a regular file", cause: failure)
            }
            throw SwiftletError.system("cannot open \(what) \(path)", errno: failure)
        }
        let owned = OwnedFileDescriptor(taking: fd)
        guard try owned.isRegularFile() else {
            throw SwiftletError(.invalidFormat, "\(what) \(path) is not a regular file (a device, FIFO, socket or directory), which is refused")
        }
        try systemCall("cannot clear O_NONBLOCK on \(path)") { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) }
        return owned
    }

    /// Writes a new file at `path` through `body` and renames it into place once `body`
    /// returns: written first to a private temporary file beside it (mode 0600, created with
    /// `O_EXCL`, so a symbolic link planted at any name is never followed), which replaces
    /// whatever `path` was (a symbolic link there is replaced, not followed). If `body` throws,
    /// nothing at `path` changes and the temporary file goes.
    public static func writeIntoPlace(_ path: String, _ body: (borrowing OwnedFileDescriptor) throws(SwiftletError) -> Void) throws(SwiftletError) {
        let temporary = try temporaryFile(beside: path)
        let temporaryPath = temporary.path
        let file = temporary.take()
        do throws(SwiftletError) {
            try body(file)
            try systemCall("cannot replace \(path)") { rename(temporaryPath, path) }
        } catch {
            unlink(temporaryPath)
            throw error
        }
    }

    /// `writeIntoPlace` with an asynchronous `body` (a download streamed into place).
    public static func writeIntoPlace(_ path: String, _ body: (borrowing OwnedFileDescriptor) async throws(SwiftletError) -> Void) async throws(SwiftletError) {
        let temporary = try temporaryFile(beside: path)
        let temporaryPath = temporary.path
        let file = temporary.take()
        do throws(SwiftletError) {
            try await body(file)
            try systemCall("cannot replace \(path)") { rename(temporaryPath, path) }
        } catch {
            unlink(temporaryPath)
            throw error
        }
    }

    /// A new private file beside `path`, for `writeIntoPlace`.
    private static func temporaryFile(beside path: String) throws(SwiftletError) -> NamedFile {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        return try temporaryFile(in: directory, prefix: "." + name + ".swiftlet")
    }

    deinit { Glibc.close(rawValue) }

    /// Gives up ownership without closing.
    public consuming func release() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }

    /// Sets the file's permission bits (fchmod).
    public func setMode(_ mode: mode_t, what: String) throws(SwiftletError) {
        let fd = rawValue
        try systemCall("cannot change the mode of \(what)") { fchmod(fd, mode) }
    }

    /// Reads exactly `count` bytes at `offset` (pread), failing on a short file.
    public func read(count: Int, at offset: UInt64, what: String) throws(SwiftletError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let fd = rawValue
        var done = 0
        while done < count {
            let result = bytes.withUnsafeMutableBytes { buffer in
                // SAFETY: the destination range [done, count) lies inside `buffer`.
                retryingOnInterrupt { pread(fd, buffer.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            }
            let n: Int
            switch result {
            case .success(let value): n = value
            case .failure(let errno): throw SwiftletError.system("cannot read \(what)", errno: errno)
            }
            if n == 0 { throw SwiftletError(.invalidFormat, "\(what) is truncated: expected \(count) bytes at offset \(offset)") }
            done += n
        }
        return bytes
    }

    /// Reads the whole of `count` bytes from `offset` straight into `destination` (pread), failing on a short file.
    public func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws(SwiftletError) {
        try Self.read(fd: rawValue, into: destination, at: offset, what: what)
    }

    /// `read(into:at:what:)` from a descriptor this value does not own.
    public static func read(fd: Int32, into destination: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws(SwiftletError) {
        var done = 0
        while done < destination.count {
            // SAFETY: the range [done, destination.count) lies inside `destination`.
            let n = try systemCall("cannot read \(what)") {
                pread(fd, destination.baseAddress! + done, destination.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw SwiftletError(.invalidFormat, "\(what) is truncated: expected \(destination.count) bytes at offset \(offset)") }
            done += n
        }
    }

    /// Writes the whole of `source` at `offset` (pwrite), retrying short writes and EINTR.
    public func write(from source: UnsafeRawBufferPointer, at offset: UInt64, what: String) throws(SwiftletError) {
        try Self.write(fd: rawValue, from: source, at: offset, what: what)
    }

    /// Writes all of `bytes` at `offset` (pwrite).
    public func write(_ bytes: [UInt8], at offset: UInt64, what: String) throws(SwiftletError) {
        let fd = rawValue
        try bytes.withBytes { b throws(SwiftletError) in try Self.write(fd: fd, from: b, at: offset, what: what) }
    }

    /// Writes the whole of `source` at `offset` to a descriptor this value does not own.
    public static func write(fd: Int32, from source: UnsafeRawBufferPointer, at offset: UInt64, what: String) throws(SwiftletError) {
        var done = 0
        while done < source.count {
            // SAFETY: the range [done, source.count) lies inside `source`.
            let n = try systemCall("cannot write \(what)") {
                pwrite(fd, source.baseAddress! + done, source.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw SwiftletError(.systemCall, "cannot write \(what): no progress at offset \(offset + UInt64(done))") }
            done += n
        }
    }

    /// Writes all of `bytes`, retrying short writes and EINTR.
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SwiftletError) {
        try Self.writeAll(fd: rawValue, bytes)
    }

    /// Reads the file's first `length` bytes in pieces of up to `pieceSize` bytes, handing each
    /// to `body` with its offset (for streaming a large file through a digest or a copy).
    public func forEachPiece(upTo length: UInt64, pieceSize: Int = 1 << 20, what: String,
                             _ body: (UnsafeRawBufferPointer, UInt64) throws(SwiftletError) -> Void) throws(SwiftletError) {
        var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(pieceSize), max(length, 1))))
        var offset: UInt64 = 0
        while offset < length {
            let count = Int(min(UInt64(buffer.count), length - offset))
            try buffer.withMutableBytes { raw throws(SwiftletError) in
                let piece = UnsafeMutableRawBufferPointer(rebasing: raw[0..<count])
                try read(into: piece, at: offset, what: what)
                try body(UnsafeRawBufferPointer(piece), offset)
            }
            offset += UInt64(count)
        }
    }

    /// `writeAll(fd:_:)` of an array.
    public static func writeAll(fd: Int32, _ bytes: [UInt8]) throws(SwiftletError) {
        try bytes.withBytes { raw throws(SwiftletError) in try writeAll(fd: fd, raw) }
    }

    /// Writes all of `bytes` to a descriptor this value does not own (stdout, say).
    public static func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer) throws(SwiftletError) {
        var done = 0
        while done < bytes.count {
            // SAFETY: the range [done, bytes.count) lies inside `bytes`.
            let n = try systemCall("cannot write") { Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done) }
            done += n
        }
    }

    /// One read(2) of what is there, up to `buffer.count` bytes, retrying EINTR: the byte count, 0
    /// at end of file. On a non-blocking descriptor with nothing to read it throws an error whose
    /// cause is `.resourceTemporarilyUnavailable`.
    public static func readSome(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, what: String) throws(SwiftletError) -> Int {
        // SAFETY: read(2) writes at most `buffer.count` bytes into `buffer`.
        try systemCall("cannot read \(what)") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// Makes reads and writes of `fd` return EAGAIN instead of waiting (O_NONBLOCK).
    public static func setNonBlocking(fd: Int32) throws(SwiftletError) {
        let flags = try systemCall("cannot read the flags of descriptor \(fd)") { fcntl(fd, F_GETFL) }
        try systemCall("cannot make descriptor \(fd) non-blocking") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
    }

    /// The file's size in bytes (fstat).
    public func size() throws(SwiftletError) -> UInt64 {
        var info = stat()
        let fd = rawValue
        try systemCall("cannot stat file") { fstat(fd, &info) }
        return UInt64(info.st_size)
    }

    /// Bytes an unprivileged user may still write to the file system holding `fd` (fstatvfs's
    /// f_bavail times f_frsize, saturating).
    public static func availableBytes(fd: Int32) throws(SwiftletError) -> UInt64 {
        var info = statvfs()
        try systemCall("cannot read the free space of a file system") { fstatvfs(fd, &info) }
        let (bytes, overflow) = UInt64(info.f_bavail).multipliedReportingOverflow(by: UInt64(info.f_frsize))
        return overflow ? .max : bytes
    }

    /// The size of the regular file open at `fd`, or nil when `fd` is something else (a pipe, a
    /// terminal) or cannot be examined.
    public static func regularFileSize(fd: Int32) -> UInt64? {
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else { return nil }
        return UInt64(info.st_size)
    }

    /// Cuts the file open at `fd` to `length` bytes and puts its offset there, so writes go on at
    /// the new end.
    public static func truncate(fd: Int32, to length: UInt64, what: String) throws(SwiftletError) {
        guard let offset = off_t(exactly: length) else {
            throw SwiftletError(.invalidArgument, "cannot truncate \(what) to \(length) bytes")
        }
        try systemCall("cannot truncate \(what)") { ftruncate(fd, offset) }
        try systemCall("cannot seek in \(what)") { lseek(fd, offset, SEEK_SET) }
    }

    /// Takes an exclusive flock(2) on the file without waiting; false when another open file
    /// description holds one (a lock goes when every descriptor of its description is closed,
    /// also when its process dies).
    public func tryLock() -> Bool { flock(rawValue, LOCK_EX | LOCK_NB) == 0 }

    /// Whether the descriptor refers to a regular file.
    public func isRegularFile() throws(SwiftletError) -> Bool {
        var info = stat()
        let fd = rawValue
        try systemCall("cannot stat file") { fstat(fd, &info) }
        return (info.st_mode & S_IFMT) == S_IFREG
    }
}

/// An open file and the path it was created at.
public struct NamedFile: ~Copyable {
    public let descriptor: OwnedFileDescriptor
    public let path: String

    public init(descriptor: consuming OwnedFileDescriptor, path: String) {
        self.descriptor = descriptor
        self.path = path
    }

    /// The descriptor, without the name.
    public consuming func take() -> OwnedFileDescriptor { descriptor }
}

extension OwnedFileDescriptor {
    /// Reads up to `limit` bytes of a small file (sysfs, procfs, configuration) whole.
    public static func readSmallFile(_ path: String, limit: Int = 1 << 20) throws(SwiftletError) -> [UInt8] {
        let fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY)
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while bytes.count < limit {
            let raw = fd.rawValue
            let result = chunk.withUnsafeMutableBytes { buffer in
                retryingOnInterrupt { Glibc.read(raw, buffer.baseAddress, buffer.count) }
            }
            switch result {
            case .success(0): return bytes
            case .success(let n): bytes += chunk[0..<n]
            case .failure(let errno): throw SwiftletError.system("cannot read \(path)", errno: errno)
            }
        }
        return bytes
    }

    /// `readSmallFile` as UTF-8 text.
    public static func readSmallTextFile(_ path: String, limit: Int = 1 << 20) throws(SwiftletError) -> String {
        String(decoding: try readSmallFile(path, limit: limit), as: UTF8.self)
    }

    /// Replaces the small file at `path` with `bytes` atomically: written and flushed to a
    /// temporary file of its own beside it (`path.tmp-RANDOM`), then renamed over it, so readers
    /// see the old content or the new, never a part. Concurrent writers each write their own
    /// temporary file; the last rename wins.
    public static func writeSmallFileAtomically(_ path: String, _ bytes: [UInt8]) throws(SwiftletError) {
        var random = [UInt8](repeating: 0, count: 8)
        try random.withMutableBytes { buffer throws(SwiftletError) in try SystemRandom.fill(buffer) }
        let temporary = path + ".tmp-" + Hex.encode(random)
        do throws(SwiftletError) {
            let file = try OwnedFileDescriptor.open(temporary, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: temporary)
            try bytes.withUnsafeBytes { raw in Result { () throws(SwiftletError) in try file.writeAll(raw) } }.get()
            let fd = file.rawValue
            try systemCall("cannot flush \(temporary)") { fsync(fd) }
            try systemCall("cannot replace \(path)") { rename(temporary, path) }
        } catch {
            unlink(temporary)
            throw error
        }
    }

    /// The names in the directory at `path` (without `.` and `..`), each with whether it is a
    /// directory itself; nil when the directory cannot be opened.
    public static func directoryEntries(_ path: String) -> [(name: String, isDirectory: Bool)]? {
        guard let handle = opendir(path) else { return nil }
        defer { closedir(handle) }
        var entries: [(name: String, isDirectory: Bool)] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { entries.append((name, entry.pointee.d_type == UInt8(DT_DIR))) }
        }
        return entries
    }
}
