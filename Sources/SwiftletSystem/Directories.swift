import Glibc
import SystemPackage

/// Creates the directory at `path` and every missing parent, as `mkdir -p` does: each new one
/// with `mode` (less the umask). Directories that already exist (or symbolic links to them) are
/// fine; anything else in the way, or a parent that cannot be created, is an error naming it.
public func makeDirectories(_ path: String, mode: mode_t = 0o755) throws(SwiftletError) {
    guard !path.isEmpty else { throw SwiftletError(.invalidArgument, "cannot create a directory with an empty path") }
    var current = path.hasPrefix("/") ? "/" : ""
    for component in path.split(separator: "/") {
        if !current.isEmpty && !current.hasSuffix("/") { current += "/" }
        current += component
        guard mkdir(current, mode) != 0 else { continue }
        let failure = currentErrno
        let whole = current == path ? "" : " (for \(path))"
        guard failure == .fileExists else { throw SwiftletError.system("cannot create \(current)\(whole)", errno: failure) }
        var info = stat()
        guard stat(current, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
            throw SwiftletError(.invalidArgument, "cannot create \(path): \(current) exists and is not a directory", cause: .notDirectory)
        }
    }
}
