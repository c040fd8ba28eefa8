import ArgumentParser
import Hypervisor
import FoundationEssentials
import Glibc
import SwiftletKit
import SwiftletSystem
import VMM

struct MachineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "machine",
        abstract: "Long-lived machines: create, start, exec, stop; their writes survive a stop.",
        discussion: """
            A machine has a name, an image, and a writable disk of its own for everything written \
            inside it. A started machine runs in a VMM process of its own (no daemon), reached through \
            a control socket in its directory, $SWIFTLET_HOME/machines/NAME.

              swiftlet machine create --name web --image alpine:3.20 --memory 512
              swiftlet machine start web
              swiftlet machine exec web -- sh -c 'echo hello > /srv/greeting'
              swiftlet machine stop web && swiftlet machine start web
              swiftlet machine exec web -- cat /srv/greeting
              swiftlet machine snapshot web -o web.snap      # and: machine restore web.snap --name web2
              swiftlet machine fork --from web --name w --count 4   # w-1 ... w-4, from web as it is now
              swiftlet machine memory web 256M    # the guest gives all but 256 MiB back to the host
              swiftlet machine migrate web --to HOST:7700 --token T  # after `machine receive web --listen 0.0.0.0:7700` there
              swiftlet machine rm -f web
            """,
        subcommands: [Create.self, Start.self, Stop.self, Status.self, List.self, Remove.self, Exec.self, Shell.self, Copy.self,
                      Pause.self, Resume.self, Memory.self, SnapshotCommand.self, Restore.self, Fork.self, Migrate.self, Receive.self, Serve.self])
}

/// How long `machine start` and `machine restore` wait for the machine's agent.
struct ReadyTimeoutOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Give up if the machine is not ready after this long.", valueName: "duration"))
    var timeout: String = "120s"

    func validate() throws {
        if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 30s") }
    }

    var milliseconds: Int { Run.milliseconds(timeout) ?? 120_000 }
}

/// A machine named by its argument or by --name.
struct MachineNameOptions: ParsableArguments {
    @Argument(help: "The machine's name (or --name).")
    var positionalName: String?

    @Option(help: "The machine's name.")
    var name: String?

    func validate() throws {
        if positionalName != nil && name != nil && positionalName != name {
            throw ValidationError("give the machine's name once: as an argument or with --name")
        }
        if positionalName == nil && name == nil { throw ValidationError("which machine? Give its name (or --name NAME)") }
    }

    var value: String { name ?? positionalName ?? "" }
}

extension MachineCommand {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a machine from an image or a pack (not started).")

        @Option(help: "The machine's name: letters, digits, '-', '_', '.'; it is also the guest's hostname.")
        var name: String

        @Option(help: ArgumentHelp("Make the machine of a machine's pack (`pack create --machine`, or of a `machine snapshot`): one with memory goes on where it was on its first start, one without boots. Network options apply; the pack's own policy is not taken.", valueName: "file"))
        var from: String?

        @OptionGroup var source: RootOptions

        @Option(help: "Guest kernel: an ELF vmlinux or a bzImage (default: the one `make kernel` built).")
        var kernel: String?

        @Option(help: "Number of vCPUs.")
        var cpus: Int = 1

        @Option(help: "Guest memory in MiB.")
        var memory: Int = 256

        @Option(help: "Size of the machine's writable disk in MiB (sparse: it takes what is written).")
        var diskSize: Int = 2048

        @Option(help: ArgumentHelp("Show the guest only this CPU baseline's features, so the machine's snapshots and packs restore on hosts of other CPU generations: \(CPUTemplate.allCases.map(\.rawValue).joined(separator: ", ")).", valueName: "name"))
        var cpuTemplate: CPUTemplate?

        @OptionGroup(title: "Network") var network: NetworkOptions

        @OptionGroup(title: "Host directories") var volumes: VolumeOptions

        func validate() throws {
            if cpus < 1 || cpus > MachineConfig.maximumCPUs { throw ValidationError("--cpus must be 1 to \(MachineConfig.maximumCPUs)") }
            if memory < MachineConfig.minimumMemoryMiB { throw ValidationError("--memory must be at least \(MachineConfig.minimumMemoryMiB) MiB") }
            if diskSize < 64 || diskSize > 16 << 20 { throw ValidationError("--disk-size must be 64 MiB to 16 TiB") }
            let shaped = source.image != nil || source.rootfs != nil || kernel != nil || cpus != 1 || memory != 256 || diskSize != 2048 || cpuTemplate != nil
            if from != nil && !volumes.volumes.isEmpty {
                throw ValidationError("--from makes the machine a pack holds, which goes on with the devices it had: --volume needs a machine that boots")
            }
            if from != nil && shaped {
                throw ValidationError("--from makes the machine a pack holds: it cannot be combined with --image, --rootfs, --kernel, --cpus, --memory, --disk-size or --cpu-template")
            }
        }

        func run() throws {
            if let from {
                try exitingOnSetupFailure { () throws(SwiftletError) in
                    try Machines.create(fromPack: from, as: name, network: try network.configuration())
                }
                printError("created machine \(name) from \(from) (its first start goes on where it was packed)")
                return
            }
            try exitingOnSetupFailure { () throws(SwiftletError) in
                var creation = Machines.Creation(name: name, root: source.root)
                creation.kernel = kernel
                creation.cpus = cpus
                creation.memoryMiB = memory
                creation.diskMiB = diskSize
                creation.cpuTemplate = cpuTemplate
                creation.network = try network.configuration()
                creation.volumes = try volumes.mounts()
                try Machines.create(creation, progress: { printError($0) })
            }
            let net = (try? network.configuration())?.summary ?? "none"
            let cpu = cpuTemplate.map { ", CPU \($0.rawValue)" } ?? ""
            printError("created machine \(name) (\(source.image ?? source.rootfs ?? "default image"), \(cpus) vCPU\(cpu), \(memory) MiB, \(diskSize) MiB disk, network: \(net))")
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a machine in a VMM process of its own; returns once its agent is ready.")

        @OptionGroup var machine: MachineNameOptions
        @OptionGroup var ready: ReadyTimeoutOptions

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                if let note = try Machines.start(machine.value, timeoutMilliseconds: ready.milliseconds) { printError(note) }
            }
            printError("started machine \(machine.value)")
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Shut a machine down cleanly; stop it by force after --timeout.")

        @OptionGroup var machine: MachineNameOptions

        @Option(help: ArgumentHelp("How long the guest gets to shut down before it is stopped by force.", valueName: "duration"))
        var timeout: String = "10s"

        func validate() throws {
            if timeout != "0", Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 10s") }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                printError(try Machines.stop(machine.value, timeoutMilliseconds: timeout == "0" ? 0 : Run.milliseconds(timeout) ?? 10_000))
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Show whether a machine runs, and how its last run ended.")

        @OptionGroup var machine: MachineNameOptions

        @Flag(help: "Print as JSON.")
        var json = false

        func run() throws {
            let summary = try exitingOnSetupFailure { () throws(SwiftletError) in try Machines.status(machine.value) }
            if json { print(try jsonText(summary)) } else { print(summary.text) }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List machines.")

        @Flag(help: "Print as JSON.")
        var json = false

        func run() throws {
            let summaries = Machines.list()
            if json {
                print(try jsonText(summaries))
                return
            }
            let rows = [["NAME", "STATE", "IMAGE", "CPUS", "MEMORY", "NETWORK", "PORTS"]] + summaries.map {
                [$0.name, $0.state, $0.image, "\($0.cpus)", "\($0.memoryMiB) MiB", $0.network, $0.ports.isEmpty ? "-" : $0.ports.joined(separator: ",")]
            }
            let last = rows[0].count - 1
            let widths = (0..<last).map { column in rows.map { $0[column].count }.max() ?? 0 }
            for row in rows {
                print(row.enumerated().map { $0.offset == last ? $0.element : $0.element.padding(to: widths[$0.offset] + 2) }.joined())
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove a stopped machine and its disk (-f: stop it first).")

        @OptionGroup var machine: MachineNameOptions

        @Flag(name: .shortAndLong, help: "Stop the machine by force if it runs.")
        var force = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in try Machines.remove(machine.value, force: force) }
            printError("removed machine \(machine.value)")
        }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a running machine: its vCPUs stop and its devices go quiet.")
        @OptionGroup var machine: MachineNameOptions
        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.pause(machine.value)
            }
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused machine.")
        @OptionGroup var machine: MachineNameOptions
        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.resume(machine.value)
            }
        }
    }

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "serve",
            abstract: "Run a machine's VMM process (started by `machine start`).", shouldDisplay: false)

        @Argument var name: String

        @Option(help: "Restore this snapshot instead of booting; the machine is a new copy and gets a new identity.")
        var from: String?

        @Flag(help: "Track the restored machine's writes, so that its next snapshot can be a diff.")
        var diffable = false

        @Option(help: ArgumentHelp("Take the machine from a migration: listen on standard input for this long (ms); the token is in the environment.", valueName: "ms"))
        var receive: Int?

        func run() throws {
            let arguments = MachineServer.invocation + [name] + (from.map { ["--from", $0] } ?? []) + (diffable ? ["--diffable"] : [])
                + (receive.map { ["--receive", "\($0)"] } ?? [])
            throw ExitCode(MachineServer.serveIfAsked(arguments) ?? ExitStatus.setupFailed)
        }
    }
}


extension MachineSummary {
    var text: String {
        var lines = ["name: \(name)", "state: \(state)", "image: \(image)", "cpus: \(cpus)", "memory: \(memoryMiB) MiB", "disk: \(diskMiB) MiB",
                     "network: \(network)"]
        if !ports.isEmpty { lines.append("ports: " + ports.joined(separator: ", ")) }
        if !volumes.isEmpty { lines.append("volumes: " + volumes.joined(separator: ", ")) }
        if let pid { lines.append("pid: \(pid)") }
        if let uptimeMilliseconds { lines.append("uptime: \(format(Double(uptimeMilliseconds) / 1000, digits: 1)) s") }
        if let hostMemoryMiB { lines.append("host memory: \(hostMemoryMiB) MiB resident") }
        if let memoryTargetMiB, let balloonMiB {
            lines.append(memoryTargetMiB < memoryMiB ? "memory target: \(memoryTargetMiB) MiB (balloon: \(balloonMiB) MiB)" : "balloon: \(balloonMiB) MiB")
        }
        if let lastExit, state == "stopped" { lines.append("last run: \(lastExit)") }
        if let problem { lines.append(problem) }
        return lines.joined(separator: "\n")
    }
}

/// JSON for `--json` output: keys sorted, slashes as they are.
func jsonText<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

extension RootOptions {
    /// The machine's root these flags name.
    var root: CommandRun.Root {
        if let image { return .image(image, policy: pull, insecureRegistry: insecureRegistry) }
        return rootfs.map { .rootfs($0) } ?? .defaultImage
    }
}
