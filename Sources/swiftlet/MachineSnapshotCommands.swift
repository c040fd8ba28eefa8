import ArgumentParser
import SwiftletKit
import SwiftletSystem
import VMM

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
            let summary = try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.snapshot(machine.value, to: output, diff: diff)
            }
            if json {
                var rounded = summary
                rounded.pausedMilliseconds = (summary.pausedMilliseconds * 100).rounded() / 100
                print(try jsonText(rounded))
            } else {
                printError("snapshot \(summary.id) of machine \(machine.value) in \(summary.directory): \(summary.memoryPagesWritten) memory pages, \(summary.bytesWritten) bytes written, guest paused \(format(summary.pausedMilliseconds, digits: 1)) ms")
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
                not modified and may be removed once the machine runs. A machine that shared \
                host directories gets them only when given again (-v, at the same guest \
                directories): a snapshot holds no host directory.
                """)

        @Argument(help: ArgumentHelp("The snapshot (`machine snapshot`).", valueName: "dir"))
        var snapshot: String

        @Option(help: "The new machine's name.")
        var name: String

        @OptionGroup(title: "Host directories")
        var volumes: VolumeOptions

        @OptionGroup var ready: ReadyTimeoutOptions

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.restore(snapshot: snapshot, as: name, volumes: try volumes.mounts(), timeoutMilliseconds: ready.milliseconds)
            }
            printError("restored machine \(name) from \(GuestAssets.resolve(snapshot) ?? snapshot)")
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
            let report = try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.fork(from: from, into: names, timeoutMilliseconds: Run.milliseconds(timeout) ?? 120_000)
            }
            if json {
                print(try jsonText(report))
            } else {
                printError("forked \(from) into \(report.clones.joined(separator: ", ")) in \(format(report.totalMilliseconds, digits: 1)) ms (snapshot \(format(report.snapshotMilliseconds, digits: 1)) ms)")
                if !report.unpublished.isEmpty {
                    printError("note: the copies do not publish \(from)'s ports (\(report.unpublished.joined(separator: ", "))): a host port serves one machine")
                }
            }
        }
    }
}
