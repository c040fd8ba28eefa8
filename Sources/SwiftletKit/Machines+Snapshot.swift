import Devices
import FoundationEssentials
import Glibc
import MachineState
import SwiftletNet
import SwiftletSystem
import VMM

/// What a machine's snapshot carries besides the machine's state: the record it was made from,
/// so that `restore` and `fork` can make a machine of it.
enum MachineSnapshotRecord {
    static let recordAnnotation = "swiftlet.machine.record"

    /// The record as a snapshot carries it: its volumes without their host directories (where
    /// the user's files are is not the snapshot's to tell; a restore is given them again).
    static func encode(_ record: MachineRecord) throws(SwiftletError) -> String {
        var record = record
        record.volumes = record.volumes?.map { VolumeMount(hostPath: "", guestPath: $0.guestPath, readOnly: $0.readOnly) }
        do { return String(decoding: try JSONEncoder().encode(record), as: UTF8.self) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the machine record: \(error)")
        }
    }

    /// The record in the snapshot in `directory`, and the file holding the machine's own disk.
    /// The record's layers and kernel are resolved on this host (`SnapshotPaths`): the snapshot
    /// directory is untrusted input. Without `checkingPaths` (a fork's own snapshot of a running
    /// machine, whose record comes from the machine store), the record is as the snapshot has it.
    static func read(_ directory: String, checkingPaths: Bool = true) throws(SwiftletError) -> (record: MachineRecord, disk: String) {
        try read(try Machine.readSnapshot(directory), directory: directory, checkingPaths: checkingPaths)
    }

    /// `read(_:checkingPaths:)` of a snapshot already read (its state is not read again).
    static func read(_ snapshot: Machine.ReadSnapshot, directory: String, checkingPaths: Bool = true) throws(SwiftletError) -> (record: MachineRecord, disk: String) {
        let annotations = snapshot.annotations
        guard let text = annotations[recordAnnotation] else {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) is not of a machine: `swiftlet machine snapshot` makes those (`swiftlet run --from` starts the others)")
        }
        let record: MachineRecord
        do { record = try JSONDecoder().decode(MachineRecord.self, from: Data(text.utf8)) } catch {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds an unreadable machine record: \(error)")
        }
        let disks = try snapshot.writableDiskFiles()
        guard disks.count == 1 else {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds \(disks.count) writable disks; a machine has one")
        }
        guard checkingPaths else { return (record, disks[0]) }
        do { return (try SnapshotPaths.checked(record), disks[0]) } catch {
            throw SwiftletError(error.code, "cannot use the snapshot in \(directory): \(error.message)")
        }
    }
}

extension MachineSnapshotRecord {
    /// The guest directories (and read-only flags) of the volumes the snapshot's machine shared,
    /// for matching the ones a restore is given; their host paths are never used.
    static func savedVolumes(_ snapshot: Machine.ReadSnapshot) -> [VolumeMount] {
        guard let text = snapshot.annotations[recordAnnotation],
              let record = try? JSONDecoder().decode(MachineRecord.self, from: Data(text.utf8)) else { return [] }
        return record.volumes ?? []
    }
}

/// What a machine snapshot wrote.
public struct MachineSnapshotSummary: Codable, Sendable {
    public var directory: String
    public var id: String
    public var memoryPagesWritten: Int
    public var bytesWritten: UInt64
    public var pausedMilliseconds: Double

    public init(directory: String, id: String, memoryPagesWritten: Int, bytesWritten: UInt64, pausedMilliseconds: Double) {
        self.directory = directory; self.id = id; self.memoryPagesWritten = memoryPagesWritten
        self.bytesWritten = bytesWritten; self.pausedMilliseconds = pausedMilliseconds
    }
}

/// What a fork made.
public struct ForkReport: Codable, Sendable {
    public var source: String
    public var clones: [String]
    /// Until the copies start: the running source's snapshot, or the copy of a snapshot's disk.
    public var snapshotMilliseconds: Double
    public var totalMilliseconds: Double
    /// The source's published ports, which the copies do not take (one host port serves one
    /// machine): empty when it had none.
    public var unpublished: [String] = []
}

extension Machines {
    /// Writes a snapshot of the running machine (vCPUs, devices, memory and its disk) to
    /// `directory`, which must not exist; with `diff`, only the memory pages written since the
    /// machine's last snapshot (or its restore). The guest pauses meanwhile and then goes on.
    public static func snapshot(_ name: String, to directory: String, diff: Bool = false) throws(SwiftletError) -> MachineSnapshotSummary {
        let machine = try MachineDirectory(name: name)
        let target = absolute(directory)
        if access(target, F_OK) == 0 {
            throw SwiftletError(.invalidArgument, "\(directory) already exists: snapshots go to a new directory")
        }
        var request = ControlRequest(.snapshot)
        request.path = target
        request.diff = diff
        let reply = try MachineLifecycle.request(machine, request)
        return MachineSnapshotSummary(directory: target, id: reply.snapshotID ?? "", memoryPagesWritten: reply.memoryPagesWritten ?? 0,
                                      bytesWritten: reply.bytesWritten ?? 0, pausedMilliseconds: reply.pausedMilliseconds ?? 0)
    }

    /// Makes a new machine `name` from a machine's snapshot and starts it where the snapshot left
    /// off: it gets a copy of the snapshot's disk and maps its memory copy-on-write; it takes its
    /// own name as hostname and reseeds its kernel's random generator. The snapshot is not modified.
    /// A machine that shared host directories is given `volumes` for them (a snapshot does not
    /// hold them): the same guest directories, read-only where they were.
    public static func restore(snapshot: String, as name: String, volumes: [VolumeMount] = [],
                               timeoutMilliseconds: Int = 120_000) throws(SwiftletError) {
        let source = absolute(snapshot)
        let directory = try MachineDirectory(name: name)
        let read = try Machine.readSnapshot(source)
        var (record, disk) = try MachineSnapshotRecord.read(read, directory: source)
        try VolumeMount.validate(volumes)
        let shared = try VolumeMount.matching(volumes, saved: MachineSnapshotRecord.savedVolumes(read), what: "the snapshot in \(snapshot)")
        record.volumes = shared.isEmpty ? nil : shared
        // The name is taken once the record exists: the machine starts outside the lock.
        let launch = try MachineDirectory.withLock { () throws(SwiftletError) -> MachineLifecycle.Launch in
            try directory.makeNew()
            do throws(SwiftletError) {
                try FileBlockBackend(path: disk, readOnly: true).copy(to: directory.diskPath)
                record.name = name
                record.created = Int(time(nil))
                record.diskBase = nil
                try directory.writeRecord(record)
                return try MachineLifecycle.Launch(directory, from: source, diffable: true)
            } catch {
                try? directory.remove()
                throw error
            }
        }
        do throws(SwiftletError) { try launch.waitUntilReady(milliseconds: timeoutMilliseconds) } catch {
            try? MachineDirectory.withLock { () throws(SwiftletError) in Fork.remove([directory]) }
            throw error
        }
    }

    /// Makes a stopped machine `name` of the pack at `pack`: a machine snapshot's pack
    /// (`machine snapshot`, then `pack create`, or `pack create --machine --with-memory`), whose
    /// first `start` goes on where the packed machine was (its processes and memory) and later
    /// starts boot; or a stopped machine's pack (`pack create --machine`), which boots. The pack
    /// is checked and unpacked into the machine's directory (`pack/`, kept while the machine
    /// exists), its disk copied out, its layers the pack's own. A pack is untrusted: its maker's
    /// network policy is not taken; the machine gets `network`, the caller's (a packed machine
    /// that had a network device needs one). A pack that is damaged or not a machine's leaves
    /// nothing behind.
    public static func create(fromPack pack: String, as name: String, network: NetworkConfiguration = NetworkConfiguration()) throws(SwiftletError) {
        let directory = try MachineDirectory(name: name)
        try MachineDirectory.withLock { () throws(SwiftletError) in
            try directory.makeNew()
            do throws(SwiftletError) {
                let unpacked = try MachinePack.unpack(absolute(pack), into: directory.packPath)
                var record: MachineRecord
                if access(unpacked.snapshotDirectory + "/" + SnapshotDirectory.stateFileName, F_OK) == 0 {
                    let disk: String
                    let read = try Machine.readSnapshot(unpacked.snapshotDirectory)
                    (record, disk) = try MachineSnapshotRecord.read(read, directory: unpacked.snapshotDirectory, checkingPaths: false)
                    guard MachineSnapshotRecord.savedVolumes(read).isEmpty else {
                        throw SwiftletError(.invalidArgument, "the machine in \(pack) shared host directories (--volume), which a pack does not hold and cannot be given: restore its snapshot with `machine restore -v` instead")
                    }
                    record.layers = try record.layers.map { path throws(SwiftletError) in try unpacked.readOnlyDisks.resolve(path) }
                    record.kernel = try SnapshotPaths.kernel(record.kernel)
                    try MachinePack.checkShape(record, what: pack)
                    let hadNetwork = try Machine.network(ofSnapshot: unpacked.snapshotDirectory) != nil
                    if hadNetwork && !network.hasNetwork {
                        throw SwiftletError(.invalidArgument, "the machine in \(pack) has a network device: give it a network policy of your own (--net, --allow-host, --allow-cidr, -p); a pack's is not taken")
                    }
                    if !hadNetwork && network.hasNetwork {
                        throw SwiftletError(.invalidArgument, "the machine in \(pack) has no network device, and a machine that goes on where it was cannot get one")
                    }
                    try FileBlockBackend(path: disk, readOnly: true).copy(to: directory.diskPath)
                    record.restoresPack = true
                } else {
                    record = try MachinePack.bootRecord(unpackedAt: directory.packPath, what: pack)
                    try FileBlockBackend(path: directory.packPath + "/" + MachinePack.machineDiskPart, readOnly: true).copy(to: directory.diskPath)
                    unlink(directory.packPath + "/" + MachinePack.machineDiskPart)
                }
                record.name = name
                record.created = Int(time(nil))
                record.diskBase = nil
                record.network = network.hasNetwork ? network : nil
                // Host directories are this user's choice, never a pack's.
                record.volumes = nil
                try directory.writeRecord(record)
            } catch {
                try? directory.remove()
                throw error
            }
        }
    }

    /// Deletes a snapshot directory (one with a snapshot's state file: anything else is refused).
    /// Machines restored from it keep running; diffs of it can no longer be restored.
    public static func removeSnapshot(_ directory: String) throws(SwiftletError) {
        let snapshot = SnapshotDirectory(directory)
        guard snapshot.exists else { throw SwiftletError(.notFound, "\(directory) is not a Swiftlet snapshot: it has no state file") }
        try FileTree.remove(snapshot.path)
    }

    /// Copies of a running machine, or of a machine's snapshot directory (a path with a slash),
    /// into new running machines `names` that continue from its state. A running source pauses
    /// for a snapshot, then goes on; the copies share its memory and disk copy-on-write.
    public static func fork(from source: String, into names: [String], timeoutMilliseconds: Int = 120_000) throws(SwiftletError) -> ForkReport {
        try Fork(from: source, names: names, timeoutMilliseconds: timeoutMilliseconds).fork()
    }
}

/// One fork: its source, its copies' names, and how long they may take to start.
struct Fork {
    let from: String
    let names: [String]
    let timeoutMilliseconds: Int

    func fork() throws(SwiftletError) -> ForkReport {
        let started = MonotonicClock.now
        let clones = try names.map { name throws(SwiftletError) in try MachineDirectory(name: name) }
        // A machine name never has a slash: with one, --from is a snapshot directory.
        if from.contains("/") { return try fork(snapshot: absolute(from), into: clones, started: started) }
        let source = try MachineDirectory(name: from)
        let record: MachineRecord
        do { record = try source.record() } catch {
            if access(from, F_OK) == 0 {
                throw SwiftletError(error.code, "\(error.message) (to fork the snapshot in the directory \(from), give it as ./\(from))")
            }
            throw error
        }
        guard case .running = source.state else {
            throw SwiftletError(.invalidArgument, "machine \(from) is not running: fork copies a running machine or a snapshot directory (start it, or snapshot it with `machine snapshot`)")
        }
        let (launches, snapshot, snapshotTaken) = try MachineDirectory.withLock { () throws(SwiftletError) in
            try Self.refuseTaken(clones)
            let snapshot = try Self.newForkDirectory(creating: false) // the source's VMM process makes it
            do throws(SwiftletError) {
                var request = ControlRequest(.snapshot)
                request.path = snapshot
                _ = try MachineLifecycle.request(source, request)
                let taken = MonotonicClock.now
                let (_, disk) = try MachineSnapshotRecord.read(snapshot, checkingPaths: false)
                return (try launchClones(clones, record: record, disk: disk, snapshot: snapshot), snapshot, taken)
            } catch {
                try? MachineDirectory.removeTree(snapshot)
                throw error
            }
        }
        return try awaitClones(launches, clones, started: started, snapshotTaken: snapshotTaken, memoryDirectory: snapshot,
                               unpublished: record.network?.published.map(\.description) ?? [])
    }

    /// Copies of the machine in a snapshot directory (`machine snapshot -o DIR`): they map its
    /// memory copy-on-write; its disk is copied once, sparsely, into machines/.forks as the base
    /// of the copies' overlays (the directory is the user's and may go, the copies' disks stay).
    func fork(snapshot directory: String, into clones: [MachineDirectory], started: UInt64) throws(SwiftletError) -> ForkReport {
        let read = try Machine.readSnapshot(directory)
        let (record, disk) = try MachineSnapshotRecord.read(read, directory: directory)
        guard MachineSnapshotRecord.savedVolumes(read).isEmpty else {
            throw SwiftletError(.invalidArgument, "the machine in the snapshot in \(from) shared host directories, which a snapshot does not hold: fork the running machine, or restore the snapshot with its volumes given again (`machine restore -v`)")
        }
        let (launches, copied) = try MachineDirectory.withLock { () throws(SwiftletError) in
            try Self.refuseTaken(clones)
            let base = try Self.newForkDirectory(creating: true)
            do throws(SwiftletError) {
                let copy = base + "/disk"
                _ = try FileBlockBackend(path: disk, readOnly: true).copy(to: copy)
                let copied = MonotonicClock.now
                return (try launchClones(clones, record: record, disk: copy, snapshot: directory), copied)
            } catch {
                try? MachineDirectory.removeTree(base)
                throw error
            }
        }
        return try awaitClones(launches, clones, started: started, snapshotTaken: copied, memoryDirectory: nil,
                               unpublished: record.network?.published.map(\.description) ?? [])
    }

    static func refuseTaken(_ clones: [MachineDirectory]) throws(SwiftletError) {
        for clone in clones where clone.exists {
            throw SwiftletError(.invalidArgument, "a machine named \(clone.name) already exists")
        }
    }

    /// A new directory in machines/.forks for what the copies of one fork share (made, or only named).
    static func newForkDirectory(creating: Bool) throws(SwiftletError) -> String {
        if mkdir(MachineDirectory.forksRoot, 0o700) != 0 && errno != EEXIST {
            throw SwiftletError.system("cannot create \(MachineDirectory.forksRoot)", errno: currentErrno)
        }
        let directory = MachineDirectory.forksRoot + "/" + (try SnapshotID.random()).description
        if creating && mkdir(directory, 0o700) != 0 { throw SwiftletError.system("cannot create \(directory)", errno: currentErrno) }
        return directory
    }

    /// Makes the copies' directories and records and starts their VMM processes, each to restore
    /// `snapshot` with an overlay over `disk`. Under the machines lock; on failure none is left.
    func launchClones(_ clones: [MachineDirectory], record source: MachineRecord, disk: String,
                      snapshot: String) throws(SwiftletError) -> [MachineLifecycle.Launch] {
        var made: [MachineDirectory] = []
        var launches: [MachineLifecycle.Launch] = []
        do throws(SwiftletError) {
            var record = source
            for clone in clones {
                try clone.makeNew()
                made.append(clone)
                record.name = clone.name
                record.created = Int(time(nil))
                record.diskBase = disk
                // A host port serves one machine: the copies keep the source's policy, not its ports.
                record.network?.published = []
                try clone.writeRecord(record)
                launches.append(try MachineLifecycle.Launch(clone, from: snapshot))
            }
            return launches
        } catch {
            Self.remove(made)
            throw error
        }
    }

    /// Waits for every copy to be ready, without the machines lock (other machines can be made
    /// meanwhile: the copies' names are taken). If one fails, every copy goes, and what they
    /// shared. `memoryDirectory`: a snapshot of the fork's own whose memory file goes once every
    /// copy has it mapped.
    func awaitClones(_ launches: [MachineLifecycle.Launch], _ clones: [MachineDirectory], started: UInt64,
                     snapshotTaken: UInt64, memoryDirectory: String?, unpublished: [String]) throws(SwiftletError) -> ForkReport {
        var failure: SwiftletError?
        for launch in launches {
            do throws(SwiftletError) { try launch.waitUntilReady(milliseconds: timeoutMilliseconds) } catch {
                if failure == nil { failure = SwiftletError(error.code, "fork \(launch.directory.name): \(error.message)") }
            }
        }
        if let failure {
            try? MachineDirectory.withLock { () throws(SwiftletError) in
                Self.remove(clones)
                MachineDirectory.removeUnusedForkBases()
            }
            throw failure
        }
        // The clones have the memory mapped: the file itself is no longer needed.
        if let memoryDirectory { unlink(SnapshotDirectory(memoryDirectory).memoryPath) }
        return ForkReport(source: from, clones: clones.map(\.name),
                      snapshotMilliseconds: MonotonicClock.milliseconds(from: started, to: snapshotTaken),
                      totalMilliseconds: MonotonicClock.milliseconds(from: started, to: MonotonicClock.now),
                      unpublished: unpublished)
    }

    /// Stops (by force) and removes `machines`.
    static func remove(_ machines: [MachineDirectory]) {
        for machine in machines {
            if case .running = machine.state { _ = try? MachineLifecycle.stop(machine, timeoutMilliseconds: 0) }
            try? machine.remove()
        }
    }
}
