import ArgumentParser
import Glibc
import SwiftletKit
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
            modified. The image's disks are referenced, not copied: keep the image in the store. \
            With network options the machine has a NIC, and `run --from` gives it a network under \
            the snapshot's policy (or under its own network options, when given).

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

    @OptionGroup(title: "Network") var network: NetworkOptions

    func validate() throws {
        if output.isEmpty { throw ValidationError("-o needs a directory") }
    }

    func run() throws {
        Glibc.signal(SIGPIPE, SIG_IGN)
        var snapshot = ImageSnapshot(root: source.root)
        snapshot.kernel = machine.kernel
        snapshot.cpus = machine.cpus
        snapshot.cpuTemplate = machine.cpuTemplate
        snapshot.memoryMiB = machine.memory
        snapshot.allowPVM = machine.allowPVM
        snapshot.showConsole = console
        snapshot.confined = true
        snapshot.network = try exitingOnSetupFailure { () throws(SwiftletError) in try network.configuration() }
        let report = try exitingOnFailure { () throws(CommandRun.Failure) in
            var failure: CommandRun.Failure
            do throws(CommandRun.Failure) { return try snapshot.make(to: output, log: { printError($0) }) } catch { failure = error }
            failure.reason = .setup // any failure to make the snapshot is Swiftlet's (status 1)
            throw failure
        }
        let paused = Double(report.pausedNanoseconds) / 1e6
        if json {
            print(try jsonText(MachineSnapshotSummary(directory: report.directory, id: report.id, memoryPagesWritten: report.memoryPagesWritten,
                                                      bytesWritten: report.bytesWritten, pausedMilliseconds: (paused * 100).rounded() / 100)))
        } else {
            printError("snapshot \(report.id) in \(report.directory): \(report.memoryPagesWritten) memory pages, \(report.bytesWritten) bytes written, guest paused \(format(paused, digits: 1)) ms")
        }
    }
}
