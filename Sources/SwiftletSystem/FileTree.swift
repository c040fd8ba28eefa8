import Glibc

/// Whole directory trees: removing one, syncing a directory entry.
public enum FileTree {
    /// Deletes `path` and everything beneath it (symlinks are removed, never followed). A path
    /// that does not exist is not an error.
    public static func remove(_ path: String) throws(SwiftletError) {
        for (name, isDirectory) in OwnedFileDescriptor.directoryEntries(path) ?? [] {
            if isDirectory {
                try remove(path + "/" + name)
            } else if unlink(path + "/" + name) != 0 && errno != ENOENT {
                throw SwiftletError.system("cannot remove \(path)/\(name)", errno: currentErrno)
            }
        }
        if rmdir(path) == 0 || errno == ENOENT { return }
        // A file given as the tree is removed too.
        if errno == ENOTDIR && (unlink(path) == 0 || errno == ENOENT) { return }
        throw SwiftletError.system("cannot remove \(path)", errno: currentErrno)
    }

    /// Makes the entry of `path` in its parent directory durable (after a rename, say). Best effort.
    public static func syncParent(of path: String) {
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        guard let directory = try? OwnedFileDescriptor.open(parent.isEmpty ? "/" : parent, flags: O_RDONLY | O_DIRECTORY) else { return }
        fsync(directory.rawValue)
    }

    /// Makes the directory `path` (not its parents), mode `mode`; one that exists is an error.
    /// Gives the file at `existing` a second name, `new` (which must not exist; the same file
    /// system): both name one file.
    public static func link(_ existing: String, as new: String) throws(SwiftletError) {
        guard Glibc.link(existing, new) == 0 else { throw SwiftletError.system("cannot link \(existing) as \(new)", errno: currentErrno) }
    }

    /// Renames `path` to `new` (replacing a file there; the same file system).
    public static func rename(_ path: String, to new: String) throws(SwiftletError) {
        guard Glibc.rename(path, new) == 0 else { throw SwiftletError.system("cannot rename \(path) to \(new)", errno: currentErrno) }
    }

    public static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws(SwiftletError) {
        try systemCall("cannot create \(path)") { mkdir(path, mode) }
    }

    /// A new directory of this user's alone (mode 0700, a name no one else had: mkdtemp) in
    /// `$TMPDIR`, else /var/tmp (on disk where /tmp is memory), else /tmp; returns its path.
    public static func makeTemporaryDirectory(prefix: String) throws(SwiftletError) -> String {
        let parent = temporaryParent
        var template = Array((parent + "/" + prefix + ".XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw SwiftletError.system("cannot create a directory in \(parent)", errno: currentErrno)
        }
        return String(cString: made)
    }

    /// Where temporary directories go: `$TMPDIR`, else /var/tmp (on disk where /tmp is memory),
    /// else /tmp.
    public static var temporaryParent: String {
        getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
            ?? (access("/var/tmp", W_OK) == 0 ? "/var/tmp" : "/tmp")
    }

    /// The path of this process's executable (`/proc/self/exe` resolved).
    public static func currentExecutable() throws(SwiftletError) -> String {
        var buffer = [CChar](repeating: 0, count: 4097)
        let count = readlink("/proc/self/exe", &buffer, 4096)
        guard count > 0 else { throw SwiftletError.system("cannot find this program's file (/proc/self/exe)", errno: currentErrno) }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `path` made absolute against the working directory (not resolved: symlinks stay).
    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return String(cString: cwd) + "/" + path
    }
}
