import Glibc
import Images
import MachineState
import SwiftletSystem

/// `$SWIFTLET_HOME/unpacked`: packs unpacked for a run, and the snapshots `pack create --machine
/// --with-memory` takes, each an entry removed when its process is done with it. Each entry NAME
/// has a sibling `NAME.lock` that its process holds (flock) for as long as it uses NAME, created
/// and locked before NAME is: so an entry whose lock can be taken belongs to a process that died
/// (SIGKILL, a crash) without removing it, and `sweep` removes it. An entry without a lock file
/// (left by an older Swiftlet) is removed once it is a day old.
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
    static func reserve(prefix: String = "", in root: String = UnpackArea.root) throws(SwiftletError) -> Reservation {
        try makeDirectories(root, mode: 0o700)
        sweep(root)
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
    static func sweep(_ root: String = UnpackArea.root) {
        let entries = OwnedFileDescriptor.directoryEntries(root) ?? []
        let names = Set(entries.map(\.name))
        for (name, isDirectory) in entries {
            let path = root + "/" + name
            if name.hasSuffix(".lock"), !isDirectory {
                guard let lock = try? OwnedFileDescriptor.open(path, flags: O_RDWR | O_NOFOLLOW | O_CLOEXEC, what: path), lock.tryLock() else { continue }
                try? FileTree.remove(String(path.dropLast(5)))
                unlink(path)
            } else if !names.contains(name + ".lock") {
                var info = stat()
                guard lstat(path, &info) == 0, Int(time(nil)) - Int(info.st_mtim.tv_sec) > abandonedAfterSeconds else { continue }
                try? FileTree.remove(path)
            }
        }
    }
}
