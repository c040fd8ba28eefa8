import Glibc
import SwiftletSystem

/// The layout of a snapshot directory, the one place that names its files (docs/snapshot-format.md):
///
/// - `state`: vCPU, interrupt-controller and device state (`StateFile`);
/// - `memory`: guest memory (`MemoryFile`), or the pages written since the parent for a diff;
/// - `disk-N`: the contents of writable disk N, as they were (sparse);
/// - `working-set`: a hint recorded by the first restore (`WorkingSet`), optional;
/// - anything a maker adds beside them (a boot template's `inputs`).
///
/// A snapshot is written into a partial directory beside its target (`TARGET.partial-ID`) and
/// renamed into place once complete, so a directory with a `state` file is a whole snapshot.
public struct SnapshotDirectory: Sendable, Equatable, CustomStringConvertible {
    public static let stateFileName = "state"
    public static let memoryFileName = "memory"
    public static let workingSetFileName = WorkingSet.fileName

    /// Absolute.
    public let path: String

    public init(_ path: String) {
        self.path = FileTree.absolute(path)
    }

    public var description: String { path }
    public var statePath: String { path + "/" + Self.stateFileName }
    public var memoryPath: String { path + "/" + Self.memoryFileName }
    public var workingSetPath: String { path + "/" + Self.workingSetFileName }
    /// Whether the directory holds a complete snapshot.
    public var exists: Bool { access(statePath, F_OK) == 0 }

    /// The name of the file that holds writable disk `index`.
    public static func diskFileName(_ index: Int) -> String { "disk-\(index)" }

    /// Whether `name` is a disk file's name, `disk-N` (N as `diskFileName` writes it), and no path.
    public static func isDiskFileName(_ name: String) -> Bool {
        guard name.hasPrefix("disk-"), let index = Int(name.dropFirst(5)), index >= 0 else { return false }
        return diskFileName(index) == name
    }

    /// The path of a disk file that a state file names. The name comes from the file, so it is
    /// checked: only `disk-N` names, never a path (a crafted state must not point a restore at a
    /// file outside the snapshot).
    public func diskPath(named name: String) throws(SwiftletError) -> String {
        guard Self.isDiskFileName(name) else {
            throw SwiftletError(.invalidFormat, "\(statePath) names a disk file \(name.debugDescription), which is not a disk file of a snapshot")
        }
        return path + "/" + name
    }

    /// A fresh partial directory for a snapshot that is to become `self` (made, mode 0700): the
    /// snapshot is written there and then `commit`ted. Concurrent writers each get their own.
    public func makePartial() throws(SwiftletError) -> SnapshotDirectory {
        let partial = SnapshotDirectory(path + ".partial-" + (try SnapshotID.random()).description)
        guard mkdir(partial.path, 0o700) == 0 else { throw SwiftletError.system("cannot create \(partial.path)", errno: currentErrno) }
        return partial
    }

    /// Moves this (complete) partial directory to `target`, which must not exist, and makes the
    /// move durable unless `durably` is false (a directory that only feeds what this process
    /// does next, which a crash ends anyway). Throws `EEXIST`/`ENOTEMPTY` as a system-call error
    /// when another writer got there first (the caller decides whether that one serves as well).
    public func commit(as target: SnapshotDirectory, durably: Bool = true) throws(SwiftletError) {
        guard rename(path, target.path) == 0 else {
            throw SwiftletError.system("cannot move the snapshot into \(target.path)", errno: currentErrno)
        }
        if durably { FileTree.syncParent(of: target.path) }
    }

    /// Deletes the directory and its files (an abandoned partial snapshot, a removed template).
    public func remove() {
        try? FileTree.remove(path)
    }
}
