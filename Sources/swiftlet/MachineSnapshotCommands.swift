import ArgumentParser
import Devices
import FoundationEssentials
import Glibc
import MachineState
import SwiftletSystem
import VMM

/// What a machine's snapshot carries besides the machine's state: the record it was made from,
/// so that `restore` and `fork` can make a machine of it.
enum MachineSnapshot {
    static let recordAnnotation = "swiftlet.machine.record"

    static func encode(_ record: MachineRecord) throws(SwiftletError) -> String {
        do { return String(decoding: try JSONEncoder().encode(record), as: UTF8.self) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the machine record: \(error)")
        }
    }

    /// The record in the snapshot in `directory`, and the file holding the machine's own disk.
    static func read(_ directory: String) throws(SwiftletError) -> (record: MachineRecord, disk: String) {
        let annotations = try Machine.annotations(ofSnapshot: directory)
        guard let text = annotations[recordAnnotation] else {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) is not of a machine: `swiftlet machine snapshot` makes those (`swiftlet run --from` starts the others)")
        }
        let record: MachineRecord
        do { record = try JSONDecoder().decode(MachineRecord.self, from: Data(text.utf8)) } catch {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds an unreadable machine record: \(error)")
        }
        let disks = try Machine.writableDiskFiles(inSnapshot: directory)
        guard disks.count == 1 else {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds \(disks.count) writable disks; a machine has one")
        }
        return (record, disks[0])
    }
}

extension MachineCommand {
    struct SnapshotCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot",
            abstract: "Save a running machine (vCPUs, devices, memory and its disk) to a new directory.",
            discussion: """
                The guest pauses while its state, memory and disk are written and then goes on. \
                --diff writes only the memory pages written since the machine's last snapshot \
                (or its restore); it needs that snapshot to restore. `machine restore DIR --name NEW` \
                makes a machine of it; `swiftlet run --from DIR -- CMD` runs a command in a throwaway copy.
                """)

        @OptionGroup var machine: MachineNameOptions

        @Option(name: .shortAndLong, help: ArgumentHelp("The directory to write the snapshot to (it must not exist).", valueName: "dir"))
        var output: String

        @Flag(help: "Only the memory pages written since the machine's last snapshot.")
        var diff = false

        @Flag(help: "Print what was written as JSON on standard output.")
        var json = false

        func validate() throws {
            if output.isEmpty { throw ValidationError("-o needs a directory") }
        }

        func run() throws {
            let reply = try exitingOnSetupFailure { () throws(SwiftletError) -> ControlReply in
                let directory = try machine.directory()
                let target = absolute(output)
                if access(target, F_OK) == 0 {
                    throw SwiftletError(.invalidArgument, "\(output) already exists: snapshots go to a new directory")
                }
                var request = ControlRequest(.snapshot)
                request.path = target
                request.diff = diff
                return try MachineLifecycle.request(directory, request)
            }
            let paused = reply.pausedMilliseconds ?? 0
            if json {
                print(try SnapshotSummary.json(directory: absolute(output), id: reply.snapshotID ?? "", memoryPagesWritten: reply.memoryPagesWritten ?? 0,
                                               bytesWritten: reply.bytesWritten ?? 0, pausedMilliseconds: paused))
            } else {
                printError("snapshot \(reply.snapshotID ?? "") of machine \(machine.value) in \(absolute(output)): \(reply.memoryPagesWritten ?? 0) memory pages, \(reply.bytesWritten ?? 0) bytes written, guest paused \(format(paused, digits: 1)) ms")
            }
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restore",
            abstract: "Make a new machine from a machine's snapshot and start it where the snapshot left off.",
            discussion: """
                The new machine gets a copy of the snapshot's disk and maps the snapshot's memory \
                copy-on-write (pages load on first touch); its processes continue, it takes its own \
                name as hostname, and its kernel's random generator is reseeded. The snapshot is \
                not modified and may be removed once the machine runs.
                """)

        @Argument(help: ArgumentHelp("The snapshot (`machine snapshot`).", valueName: "dir"))
        var snapshot: String

        @Option(help: "The new machine's name.")
        var name: String

        @Option(help: ArgumentHelp("Give up if the machine is not ready after this long.", valueName: "duration"))
        var timeout: String = "120s"

        func validate() throws {
            if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 30s") }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let source = absolute(snapshot)
                let directory = try MachineDirectory(name: name)
                var (record, disk) = try MachineSnapshot.read(source)
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
                do throws(SwiftletError) { try launch.waitUntilReady(milliseconds: Run.milliseconds(timeout) ?? 120_000, timeout: timeout) } catch {
                    try? MachineDirectory.withLock { () throws(SwiftletError) in Fork.remove([directory]) }
                    throw error
                }
                printError("restored machine \(name) from \(source)")
            }
        }
    }

    struct Fork: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "fork",
            abstract: "Copy a running machine, or a machine's snapshot, into new running machines that continue from its state.",
            discussion: """
                A running source pauses for a snapshot (memory and disk), then goes on. Each copy maps \
                that memory copy-on-write and gets a copy-on-write overlay over that disk, so the \
                copies share everything they have not changed. Each copy takes its own name as \
                hostname and reseeds its kernel's random generator. From a snapshot directory \
                (`machine snapshot -o DIR`; give it with a slash), the copies map its memory and \
                share one copy of its disk.

                  swiftlet machine fork --from web --name worker --count 8   # worker-1 ... worker-8
                  swiftlet machine fork --from ./web.snap --name job --count 4
                """)

        @Option(help: ArgumentHelp("The running machine to copy, or a snapshot directory (with a slash: ./DIR).", valueName: "name|dir"))
        var from: String

        @Option(help: "The new machine's name; with --count K the copies are NAME-1 ... NAME-K.")
        var name: String

        @Option(help: "How many copies.")
        var count: Int = 1

        @Option(help: ArgumentHelp("Give up if the copies are not ready after this long.", valueName: "duration"))
        var timeout: String = "120s"

        @Flag(help: "Print the copies and the time taken as JSON on standard output.")
        var json = false

        func validate() throws {
            if count < 1 || count > 1024 { throw ValidationError("--count must be 1 to 1024") }
            if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 30s") }
        }

        var names: [String] { count == 1 ? [name] : (1...count).map { "\(name)-\($0)" } }

        func run() throws {
            let report = try exitingOnSetupFailure { () throws(SwiftletError) in try fork() }
            if json {
                print(try MachineSummary.json(report))
            } else {
                printError("forked \(from) into \(report.clones.joined(separator: ", ")) in \(format(report.totalMilliseconds, digits: 1)) ms (snapshot \(format(report.snapshotMilliseconds, digits: 1)) ms)")
            }
        }

        struct Report: Encodable {
            var source: String
            var clones: [String]
            /// Until the copies start: the running source's snapshot, or the copy of a snapshot's disk.
            var snapshotMilliseconds: Double
            var totalMilliseconds: Double
        }

        func fork() throws(SwiftletError) -> Report {
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
                    let (_, disk) = try MachineSnapshot.read(snapshot)
                    return (try launchClones(clones, record: record, disk: disk, snapshot: snapshot), snapshot, taken)
                } catch {
                    try? MachineDirectory.removeTree(snapshot)
                    throw error
                }
            }
            return try awaitClones(launches, clones, started: started, snapshotTaken: snapshotTaken, memoryDirectory: snapshot)
        }

        /// Copies of the machine in a snapshot directory (`machine snapshot -o DIR`): they map its
        /// memory copy-on-write; its disk is copied once, sparsely, into machines/.forks as the base
        /// of the copies' overlays (the directory is the user's and may go, the copies' disks stay).
        func fork(snapshot directory: String, into clones: [MachineDirectory], started: UInt64) throws(SwiftletError) -> Report {
            let (record, disk) = try MachineSnapshot.read(directory)
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
            return try awaitClones(launches, clones, started: started, snapshotTaken: copied, memoryDirectory: nil)
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
                         snapshotTaken: UInt64, memoryDirectory: String?) throws(SwiftletError) -> Report {
            var failure: SwiftletError?
            for launch in launches {
                do throws(SwiftletError) { try launch.waitUntilReady(milliseconds: Run.milliseconds(timeout) ?? 120_000, timeout: timeout) } catch {
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
            if let memoryDirectory { unlink(memoryDirectory + "/memory") }
            return Report(source: from, clones: clones.map(\.name),
                          snapshotMilliseconds: MonotonicClock.milliseconds(from: started, to: snapshotTaken),
                          totalMilliseconds: MonotonicClock.milliseconds(from: started, to: MonotonicClock.now))
        }

        /// Stops (by force) and removes `machines`.
        static func remove(_ machines: [MachineDirectory]) {
            for machine in machines {
                if case .running = machine.state { try? MachineLifecycle.stop(machine, timeoutMilliseconds: 0, quiet: true) }
                try? machine.remove()
            }
        }
    }
}
