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

    /// `path` made absolute against the working directory (not resolved: symlinks stay).
    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return String(cString: cwd) + "/" + path
    }
}
