import FoundationEssentials
import Hypervisor
import Glibc
import Images
import SwiftletNet
import SwiftletSystem

/// What `swiftlet machine create` recorded about a machine: its root, its shape, and how commands
/// run in it. Stored as `machine.json` in the machine's directory.
public struct MachineRecord: Codable, Equatable, Sendable {
    public var name: String
    /// What the root was made from, as the user named it (an image reference, a --rootfs path, or
    /// "default").
    public var source: String
    /// The read-only layer disks, bottom first.
    public var layers: [String]
    public var defaults: ExecDefaults
    public var cpus: Int
    public var memoryMiB: Int
    public var kernel: String?
    /// The size of the machine's writable disk (its root's upper layer).
    public var diskMiB: Int
    /// For a fork: `disk.img` is a copy-on-write overlay over this disk, which its siblings share
    /// (kept in `machines/.forks/ID/`, removed with the last machine that uses it).
    public var diskBase: String? = nil
    /// Seconds since the epoch.
    public var created: Int
    /// What the machine's network may reach; nil (or a policy that asks for nothing): no network
    /// device.
    public var network: NetworkConfiguration? = nil
    /// A machine made from a pack (`Machines.create(fromPack:as:)`): its next start restores the
    /// packed snapshot (`pack/snapshot` in its directory) instead of booting; cleared once it has.
    public var restoresPack: Bool? = nil
    /// The CPU baseline the machine's guest is shown (`--cpu-template`); nil: the host's CPU.
    public var cpuTemplate: CPUTemplate? = nil
    /// Host directories the machine's guest sees (`--volume`); nil or empty: none.
    public var volumes: [VolumeMount]? = nil
}

/// One machine's directory, `$SWIFTLET_HOME/machines/NAME`:
///
/// - `machine.json`: the record (written last by `create`: a directory without it is not a machine);
/// - `disk.img`: the writable ext4 disk holding the root's changes, kept across stops;
/// - `lock`: held (flock) by the machine's VMM process for as long as it runs;
/// - `vmm.pid`: the VMM process's pid, removed when it ends in order — left behind, it means the
///   process died without cleaning up (crashed or was killed);
/// - `control.sock`: the VMM process's control socket;
/// - `console.log`, `vmm.log`: the guest console and the VMM process's own messages, last run;
/// - `passt.log`: the machine's network stack's log (a machine with a network), last run;
/// - `last-exit`: how the last run ended;
/// - `pack/`: a machine made from a pack: the pack's snapshot (`pack/snapshot`) and read-only
///   disks (`pack/disks`), checked and unpacked, kept while the machine exists.
public struct MachineDirectory: Sendable {
    public let name: String
    public let path: String

    public static var root: String { ImageStore.defaultRoot() + "/machines" }

    /// A machine name: a letter or digit, then letters, digits, `-`, `_` or `.`, at most 63 in all
    /// (it becomes the guest's hostname and a directory name).
    public static func validate(name: String) throws(SwiftletError) {
        let bytes = Array(name.utf8)
        func allowed(_ b: UInt8, first: Bool) -> Bool {
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (!first && (b == 0x2D || b == 0x5F || b == 0x2E))
        }
        guard !bytes.isEmpty, bytes.count <= 63, allowed(bytes[0], first: true), bytes.dropFirst().allSatisfy({ allowed($0, first: false) }) else {
            throw SwiftletError(.invalidArgument, "\"\(name)\" is not a machine name: use up to 63 letters, digits, '-', '_' or '.', starting with a letter or digit")
        }
    }

    public init(name: String) throws(SwiftletError) {
        try Self.validate(name: name)
        self.name = name
        self.path = Self.root + "/" + name
    }

    public var recordPath: String { path + "/machine.json" }
    public var diskPath: String { path + "/disk.img" }
    public var lockPath: String { path + "/lock" }
    public var pidPath: String { path + "/vmm.pid" }
    public var socketPath: String { path + "/control.sock" }
    public var consolePath: String { path + "/console.log" }
    public var logPath: String { path + "/vmm.log" }
    public var passtLogPath: String { path + "/passt.log" }
    public var lastExitPath: String { path + "/last-exit" }
    public var packPath: String { path + "/pack" }
    /// The snapshot a machine that arrived by migration runs from (its memory maps the file).
    public var migratedPath: String { path + "/migrated" }

    public var exists: Bool { access(recordPath, F_OK) == 0 }

    /// The record, or a clear error when there is no such machine.
    public func record() throws(SwiftletError) -> MachineRecord {
        guard exists else {
            throw SwiftletError(.notFound, "no machine named \(name): `swiftlet machine ls` lists them, `swiftlet machine create --name \(name)` makes it")
        }
        let bytes = try OwnedFileDescriptor.readSmallFile(recordPath)
        do { return try JSONDecoder().decode(MachineRecord.self, from: Data(bytes)) } catch {
            throw SwiftletError(.invalidFormat, "\(recordPath) is unreadable (\(error)): remove the machine with `swiftlet machine rm -f \(name)`")
        }
    }

    /// Where forks keep the disk their clones share (`.forks/ID/disk-N`, from the snapshot the
    /// fork took of its source), until the last clone is removed.
    static var forksRoot: String { root + "/.forks" }

    /// Runs `body` holding the machines lock: one create, restore, fork or removal at a time.
    /// A directory without its record is a create in progress or one that died, which the next
    /// one under the lock may clear.
    public static func withLock<T>(_ body: () throws(SwiftletError) -> T) throws(SwiftletError) -> T {
        try makeDirectories(root, mode: 0o700)
        let lock = try OwnedFileDescriptor.open(root + "/.lock", flags: O_RDWR | O_CREAT, mode: 0o600, what: "the machines lock")
        flock(lock.rawValue, LOCK_EX)
        defer { flock(lock.rawValue, LOCK_UN) }
        return try body()
    }

    /// Makes the (empty) directory of a new machine; a name that is taken is refused. Under `withLock`.
    func makeNew() throws(SwiftletError) {
        if exists { throw SwiftletError(.invalidArgument, "a machine named \(name) already exists") }
        if access(path, F_OK) == 0 {
            // A directory without a record: a machine being received (its VMM process holds the
            // lock), or what a failed command left.
            if let lock = try? OwnedFileDescriptor.open(lockPath, flags: O_RDWR, what: lockPath), flock(lock.rawValue, LOCK_EX | LOCK_NB) != 0 {
                throw SwiftletError(.invalidArgument, "a machine named \(name) is arriving (`swiftlet machine receive`)")
            }
            try Self.removeTree(path)
        }
        guard mkdir(path, 0o700) == 0 else { throw SwiftletError.system("cannot create \(path)", errno: currentErrno) }
    }

    /// Removes the forks' shared disks that no machine uses any more. Under `withLock`.
    static func removeUnusedForkBases() {
        let used = Set(all().compactMap { try? $0.record().diskBase })
        for (id, isDirectory) in OwnedFileDescriptor.directoryEntries(forksRoot) ?? [] where isDirectory {
            let directory = forksRoot + "/" + id
            if !used.contains(where: { $0.hasPrefix(directory + "/") }) { try? removeTree(directory) }
        }
    }

    /// The image layer disks the machines boot from (their records' `layers`): `image rm` and
    /// `image prune` keep them. A machine whose record cannot be read is skipped (it cannot start either).
    public static func layerDisksInUse() -> Set<String> {
        Set(all().flatMap { (try? $0.record().layers) ?? [] })
    }

    /// Every machine, by name.
    public static func all() -> [MachineDirectory] {
        let names = (OwnedFileDescriptor.directoryEntries(root) ?? []).map(\.name)
        return names.sorted().compactMap { try? MachineDirectory(name: $0) }.filter(\.exists)
    }

    // MARK: state

    public enum State: Equatable, Sendable {
        case stopped
        /// The VMM process runs (it holds the lock).
        case running(pid: Int32)
        /// The VMM process ended without cleaning up after itself: killed, or it crashed.
        case crashed(pid: Int32)
    }

    /// Whether the VMM process runs, asked of the lock it holds (a pid alone could be reused).
    public var state: State {
        let pid = (try? OwnedFileDescriptor.readSmallTextFile(pidPath)).flatMap { Int32(trimmed($0)) }
        let fd = open(lockPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return pid.map { .crashed(pid: $0) } ?? .stopped }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) != 0 { return .running(pid: pid ?? 0) }
        return pid.map { .crashed(pid: $0) } ?? .stopped
    }

    /// Takes the lock a VMM process holds while the machine runs, so that none can start while
    /// the caller holds the descriptor; refuses if one runs.
    func lockStopped() throws(SwiftletError) -> OwnedFileDescriptor {
        let lock = try OwnedFileDescriptor.open(lockPath, flags: O_RDWR | O_CREAT, mode: 0o600, what: lockPath)
        guard flock(lock.rawValue, LOCK_EX | LOCK_NB) == 0 else {
            throw SwiftletError(.invalidArgument, "machine \(name) is running: stop it first (`swiftlet machine stop \(name)`) or use `rm -f`")
        }
        return lock
    }

    /// How the last run ended, if one did.
    public var lastExit: String? {
        (try? OwnedFileDescriptor.readSmallTextFile(lastExitPath)).map(trimmed)
    }

    /// The last lines of the VMM process's log, for a crash report.
    public func logTail(lines: Int = 10) -> String {
        guard let text = try? OwnedFileDescriptor.readSmallTextFile(logPath, limit: 1 << 24) else { return "" }
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    func writeRecord(_ record: MachineRecord) throws(SwiftletError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let bytes: [UInt8]
        do { bytes = Array(try encoder.encode(record)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the machine record: \(error)")
        }
        try OwnedFileDescriptor.writeSmallFileAtomically(recordPath, bytes)
    }

    /// Deletes the machine's directory and everything in it.
    func remove() throws(SwiftletError) {
        try Self.removeTree(path)
    }

    static func removeTree(_ path: String) throws(SwiftletError) {
        try FileTree.remove(path)
    }
}

/// `text` without leading and trailing whitespace.
func trimmed(_ text: String) -> String {
    String(text.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
}
