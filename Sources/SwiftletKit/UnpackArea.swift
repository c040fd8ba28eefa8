import Glibc
import Images
import MachineState
import SwiftletSystem

/// `$SWIFTLET_HOME/unpacked`: packs unpacked for a run, and the snapshots `pack create --machine
/// --with-memory` takes, each an entry removed when its process is done with it (and, for packed
/// programs, which have no home, `swiftlet-pack-*` entries in the temporary directory). Each
/// entry NAME has a sibling `NAME.lock` that its process holds (flock) for as long as it uses
/// NAME, created and locked before NAME is: so an entry whose lock can be taken belongs to a
/// process that died (SIGKILL, a crash) without removing it, and `sweep` removes it. An entry
/// without a lock file (left by an older Swiftlet) is removed once it is a day old. Only this
/// user's own directories and lock files are touched (never a symbolic link: the temporary
/// directory is shared).
enum UnpackArea {
    static var root: String { ImageStore.defaultRoot() + "/unpacked" }
    static let abandonedAfterSeconds = 86_400

    /// A reserved entry: its path, and its lock, held until the descriptor is closed.
    struct Reservation: ~Copyable {
        let path: String
        let lock: OwnedFileDescriptor

        /// The lock, for the value that keeps the entry.
        consuming func takeLock() -> OwnedFileDescriptor { lock }
    }

    /// A new entry's path in `root` (not created: the caller makes it) and its held lock;
    /// removes abandoned entries first.
    /// In a shared directory (`in` the temporary directory), only names starting with `prefix`
    /// are swept.
    static func reserve(prefix: String = "", in root: String = UnpackArea.root, shared: Bool = false) throws(SwiftletError) -> Reservation {
        if !shared { try makeDirectories(root, mode: 0o700) }
        sweep(root, only: shared ? prefix : "")
        let path = root + "/" + prefix + (try SnapshotID.random()).description
        let lock = try OwnedFileDescriptor.open(path + ".lock", flags: O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600,
                                                what: "the lock of \(path)")
        guard lock.tryLock() else { throw SwiftletError(.systemCall, "\(path).lock is locked by another process") }
        return Reservation(path: path, lock: lock)
    }

    /// Removes an entry and its lock file (the caller holds the lock, and closes it after).
    static func release(_ path: String) {
        try? FileTree.remove(path)
        unlink(path + ".lock")
    }

    /// Removes the entries of processes that are gone (their lock can be taken) and day-old
    /// entries without a lock file.
    static func sweep(_ root: String = UnpackArea.root, only prefix: String = "") {
        let entries = (OwnedFileDescriptor.directoryEntries(root) ?? []).filter { $0.name.hasPrefix(prefix) }
        let names = Set(entries.map(\.name))
        for (name, _) in entries {
            let path = root + "/" + name
            if name.hasSuffix(".lock") {
                guard ours(path, type: S_IFREG),
                      let lock = try? OwnedFileDescriptor.open(path, flags: O_RDWR | O_NOFOLLOW | O_CLOEXEC, what: path), lock.tryLock() else { continue }
                let entry = String(path.dropLast(5))
                if ours(entry, type: S_IFDIR) { try? FileTree.remove(entry) }
                unlink(path)
            } else if !names.contains(name + ".lock") {
                var info = stat()
                guard ours(path, type: S_IFDIR), lstat(path, &info) == 0, Int(time(nil)) - Int(info.st_mtim.tv_sec) > abandonedAfterSeconds else { continue }
                try? FileTree.remove(path)
            }
        }
    }

    /// Whether `path` itself (not what a link names) is of `type` and this user's.
    static func ours(_ path: String, type: mode_t) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0 && info.st_mode & S_IFMT == type && info.st_uid == geteuid()
    }
}
