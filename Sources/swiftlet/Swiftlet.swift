import ArgumentParser
import SwiftletKit
import SwiftletSystem

@main
struct Swiftlet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftlet",
        abstract: "Run Linux in microVMs on KVM.",
        version: "0.1.0",
        subcommands: [Run.self, MachineCommand.self, Snapshot.self, PackCommand.self, Boot.self, Image.self, Kernel.self])

    /// The commands whose start-up latency counts, parsed as themselves alone: building the whole
    /// command tree first (every subcommand's arguments, found by reflection) was a third of a
    /// restore's process start. `machine serve` is every machine's and every fork copy's VMM process.
    static let parsedAlone: [(path: [String], command: any ParsableCommand.Type)] = [
        (["run"], Run.self), (["machine", "exec"], MachineCommand.Exec.self), (["machine", "serve"], MachineCommand.Serve.self),
    ]

    /// Anything a command parsed alone does not accept (help, a bad flag) goes the whole way, so
    /// that the messages and usage are the tree's.
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let packed = PackedProgram.path { PackedProgram.main(path: packed, arguments: arguments) }
        if let entry = parsedAlone.first(where: { arguments.starts(with: $0.path) }),
           var command = try? entry.command.parse(Array(arguments.dropFirst(entry.path.count))) as any ParsableCommand {
            do { try command.run() } catch { Swiftlet.exit(withError: error) }
            Swiftlet.exit()
        }
        Swiftlet.main(arguments)
    }
}

/// Prints `swiftlet: message` to stderr.
func printError(_ message: String) {
    var line = "swiftlet: " + message + "\n"
    line.withUTF8 { try? OwnedFileDescriptor.writeAll(fd: 2, UnsafeRawBufferPointer($0)) }
}

/// Runs a command's work; a failure is printed as one `swiftlet:` line and ends the command with
/// status 1 (Swiftlet could not do what was asked).
func exitingOnSetupFailure<T>(_ body: () throws(SwiftletError) -> T) throws -> T {
    do {
        return try body()
    } catch {
        printError(error.description)
        if error.code == .interrupted, let signal = error.signal { throw ExitCode(128 + signal) }
        throw ExitCode(Status.setupFailed)
    }
}

/// Exit statuses, documented in the README (the library's, which machines' VMM processes use too).
typealias Status = ExitStatus

/// Runs a command's work; a run failure is printed (the end of the guest console first, when it
/// tells why) and ends the command with its status.
func exitingOnFailure<T>(timeout: String? = nil, _ body: () throws(CommandRun.Failure) -> T) throws -> T {
    do {
        return try body()
    } catch {
        if let cause = error.cause { printError(cause) }
        if let tail = error.consoleTail { writeError(tail) }
        switch error.reason {
        case .setup:
            printError(error.message)
            throw ExitCode(Status.setupFailed)
        case .guest:
            printError(error.message)
            throw ExitCode(Status.guestCrashed)
        case .timedOut:
            printError("the command did not finish within \(timeout ?? error.message); the VM was stopped")
            throw ExitCode(Status.timedOut)
        case .interrupted(let signal):
            printError(error.message)
            throw ExitCode(128 + signal)
        }
    }
}

/// Writes `text` to stderr as it is.
func writeError(_ text: String) {
    var text = text
    text.withUTF8 { try? OwnedFileDescriptor.writeAll(fd: 2, UnsafeRawBufferPointer($0)) }
}
