import ArgumentParser
import FoundationEssentials
import Glibc
import SwiftletSystem
import VMM

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Boot an image until its guest agent is ready and save the machine, for `swiftlet run --from`.",
        discussion: """
            Boots the image (--image; the default busybox image without it) with the guest agent, \
            waits until the agent is ready, and writes a full snapshot of the machine to the \
            output directory: vCPU, device and interrupt-controller state, and guest memory (a \
            sparse file: pages the guest never wrote take no space). `swiftlet run --from DIR -- CMD` \
            then starts from there instead of booting, as many times as wanted; the snapshot is never \
            modified. The image's disks are referenced, not copied: keep the image in the store.

              swiftlet snapshot --image alpine:3.20 --memory 512 -o alpine.snap
              swiftlet run --from alpine.snap -- echo hi
            """)

    @Option(name: .shortAndLong, help: ArgumentHelp("The directory to write the snapshot to (it must not exist).", valueName: "dir"))
    var output: String

    @OptionGroup var source: RootOptions

    @Flag(help: "Show the guest kernel's console on standard error.")
    var console = false

    @Flag(help: "Print what was written as JSON on standard output.")
    var json = false

    @OptionGroup var machine: MachineOptions

    func validate() throws {
        if output.isEmpty { throw ValidationError("-o needs a directory") }
    }

    func run() throws {
        Glibc.signal(SIGPIPE, SIG_IGN)
        let report = try exitingOnSetupFailure { () throws(SwiftletError) in try make() }
        if json {
            print(try SnapshotSummary.json(directory: report.directory, id: report.id, memoryPagesWritten: report.memoryPagesWritten,
                                           bytesWritten: report.bytesWritten, pausedMilliseconds: Double(report.pausedNanoseconds) / 1e6))
        } else {
            printError("snapshot \(report.id) in \(report.directory): \(report.memoryPagesWritten) memory pages, \(report.bytesWritten) bytes written, guest paused \(format(Double(report.pausedNanoseconds) / 1e6, digits: 1)) ms")
        }
    }

    func make() throws(SwiftletError) -> SnapshotReport {
        if access(output, F_OK) == 0 {
            throw SwiftletError(.invalidArgument, "\(output) already exists: snapshots go to a new directory")
        }
        let root = try RootFilesystem.resolve(source, image: source.image, signals: -1)
        let consoleLog = console ? nil : ConsoleLog()
        let port = try InProcessPort(port: Run.agentPort)
        let vm = Machine(config: try root.agentMachineConfig(machine, consoleOutput: console ? 2 : consoleLog?.fd), vsockPorts: port)
        let machineThread = try MachineThread(vm)
        defer { machineThread.stop() }

        func failure(_ reason: String) -> SwiftletError {
            let outcome = machineThread.stop()
            consoleLog?.printTail()
            switch outcome {
            case .failure(let error)?: return error
            case .success(let report)?: return SwiftletError(.guestFailure, "\(reason) (\(report.exit))")
            case nil: return SwiftletError(.guestFailure, reason)
            }
        }
        guard let connection = port.next(timeoutMilliseconds: -1, cancel: machineThread.ended) else {
            throw failure("the guest stopped before its agent connected")
        }
        let session = AgentSession(socket: connection)
        guard try session.waitUntilReady() else { throw failure("the guest agent hung up before it was ready") }
        return try vm.snapshotBlocking(to: output, annotations: [AgentSnapshot.annotation: try AgentSnapshot.encode(root.defaults)])
    }
}

/// What `swiftlet snapshot --json` and `machine snapshot --json` print: one JSON object.
struct SnapshotSummary: Encodable {
    var directory: String
    var id: String
    var memoryPagesWritten: Int
    var bytesWritten: UInt64
    var pausedMilliseconds: Double

    static func json(directory: String, id: String, memoryPagesWritten: Int, bytesWritten: UInt64, pausedMilliseconds: Double) throws -> String {
        try MachineSummary.json(SnapshotSummary(directory: directory, id: id, memoryPagesWritten: memoryPagesWritten, bytesWritten: bytesWritten,
                                                pausedMilliseconds: (pausedMilliseconds * 100).rounded() / 100))
    }
}

/// What `swiftlet snapshot` stores with a snapshot for `run --from`: how commands run in its image.
enum AgentSnapshot {
    static let annotation = "swiftlet.agent.exec-defaults"

    static func encode(_ defaults: ExecDefaults) throws(SwiftletError) -> String {
        do { return String(decoding: try JSONEncoder().encode(defaults), as: UTF8.self) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode the image's command defaults: \(error)")
        }
    }

    /// The defaults stored with the snapshot a machine was restored from.
    static func defaults(of machine: Machine, directory: String) throws(SwiftletError) -> ExecDefaults {
        guard let text = machine.restoredAnnotations[annotation] else {
            throw SwiftletError(.invalidArgument, "the snapshot in \(directory) has no guest agent to run a command in: make one with `swiftlet snapshot`")
        }
        do { return try JSONDecoder().decode(ExecDefaults.self, from: Data(text.utf8)) } catch {
            throw SwiftletError(.invalidFormat, "the snapshot in \(directory) holds unreadable command defaults: \(error)")
        }
    }
}
