import ArgumentParser
import Glibc
import SwiftletKit
import SwiftletSystem
import VMM

extension MachineCommand {
    struct Receive: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "receive",
            abstract: "Wait for a machine migrating here; it runs here under NAME.",
            discussion: """
                Prints a one-time token alone on the first line of standard output, then waits for \
                `swiftlet machine migrate` on the source to connect with it. Connections without the \
                token are refused and the wait goes on. Returns once the machine runs here.

                  dest$   swiftlet machine receive web --listen 0.0.0.0:7700
                  source$ swiftlet machine migrate web --to dest:7700 --token TOKEN

                The stream is authenticated, not encrypted: on a network you do not trust, carry it \
                through a tunnel (ssh -L, WireGuard).
                """)

        @OptionGroup var machine: MachineNameOptions

        @Option(help: ArgumentHelp("Where to listen for the source: HOST:PORT, [IPV6]:PORT (port 0: any free port, printed).", valueName: "addr:port"))
        var listen: String

        @Option(help: ArgumentHelp("Give up if no machine arrived after this long.", valueName: "duration"))
        var timeout: String = "10m"

        @Flag(help: "Print the invitation and the outcome as JSON lines.")
        var json = false

        func validate() throws {
            if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 10m") }
            do { _ = try TCPEndpoint(parsing: listen) } catch { throw ValidationError("--listen \(error.message)") }
        }

        func run() throws {
            let endpoint = try TCPEndpoint(parsing: listen)
            let json = self.json
            let report = try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.receive(as: machine.value, listen: endpoint, timeoutMilliseconds: Run.milliseconds(timeout) ?? 600_000) { invitation in
                    if json {
                        print((try? jsonText(invitation)) ?? "{}")
                    } else {
                        print(invitation.token)
                        printError("waiting on \(invitation.listen) for machine \(machine.value) (`swiftlet machine migrate NAME --to ADDR:PORT --token TOKEN` on the source)")
                    }
                    fflush(nil)
                }
            }
            if json { print(try jsonText(report)) } else { printError("machine \(report.name) arrived and runs here") }
        }
    }

    struct Migrate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "migrate",
            abstract: "Move a running machine to another host (or SWIFTLET_HOME) with a short pause.",
            discussion: """
                Pre-copy: memory and the machine's disk are sent while it runs, then what was written \
                meanwhile, round after round, until the rest fits --max-downtime; then the machine \
                pauses, the rest goes, and it resumes on the destination, where `machine receive` \
                waits. Afterwards nothing of the machine is left here. Published ports are bound on \
                the destination; connections into the guest (exec sessions, open flows) are reset. \
                If the copying does not converge, or anything fails before the destination takes \
                over, the machine keeps running here.
                """)

        @OptionGroup var machine: MachineNameOptions

        @Option(help: ArgumentHelp("The destination, as `machine receive --listen` there: HOST:PORT.", valueName: "addr:port"))
        var to: String

        @Option(help: ArgumentHelp("The token `machine receive` printed.", valueName: "token"))
        var token: String

        @Option(name: .customLong("max-downtime"), help: ArgumentHelp("The longest pause to aim for.", valueName: "duration"))
        var maxDowntime: String = "50ms"

        @Option(name: .customLong("max-rounds"), help: ArgumentHelp("The most copying rounds before giving up.", valueName: "n"))
        var maxRounds: Int = 30

        @Option(help: ArgumentHelp("Give up (the machine keeps running here) if the copying takes longer.", valueName: "duration"))
        var timeout: String = "2m"

        @Option(help: ArgumentHelp("Send at most this many bytes per second (K, M, G: 1024-based), e.g. 100M.", valueName: "rate"))
        var bandwidth: String?

        /// `--bandwidth` in bytes per second.
        static func rate(_ text: String) -> UInt64? { byteCount(text, unit: 1) }

        @Flag(help: "If the copying does not converge, let the destination run the machine at once and fetch the rest as its guest needs it (post-copy) instead of giving up.")
        var postcopy = false

        @Flag(help: "Print progress and the outcome as JSON lines.")
        var json = false

        func validate() throws {
            if Run.milliseconds(maxDowntime) == nil { throw ValidationError("--max-downtime \(maxDowntime): expected a duration such as 50ms") }
            if Run.milliseconds(timeout) == nil { throw ValidationError("--timeout \(timeout): expected a duration such as 2m") }
            guard maxRounds >= 1, maxRounds <= 1000 else { throw ValidationError("--max-rounds must be from 1 to 1000") }
            if let bandwidth, Self.rate(bandwidth) == nil { throw ValidationError("--bandwidth \(bandwidth): expected bytes per second such as 100M") }
            do { _ = try TCPEndpoint(parsing: to) } catch { throw ValidationError("--to \(error.message)") }
            do { try Machines.checkMigrationToken(token) } catch { throw ValidationError("--token: \(error.message)") }
        }

        func run() throws {
            let destination = try TCPEndpoint(parsing: to)
            let options = MigrationOptions(maximumDowntimeMilliseconds: Run.milliseconds(maxDowntime) ?? 50, maximumRounds: maxRounds,
                                           timeLimitMilliseconds: Run.milliseconds(timeout) ?? 120_000,
                                           bandwidthBytesPerSecond: bandwidth.flatMap(Self.rate), postcopy: postcopy)
            let json = self.json
            let terminal = isatty(2) == 1
            let report = try exitingOnSetupFailure { () throws(SwiftletError) in
                try Machines.migrate(machine.value, to: destination, token: token, options: options) { progress in
                    if json {
                        print((try? jsonText(progress)) ?? "{}")
                        fflush(nil)
                    } else if terminal {
                        let rate = progress.bytesPerSecond.map { ", \(format($0 / 1_048_576, digits: 1)) MiB/s" } ?? ""
                        if progress.pausing == true {
                            printError("pausing the machine: \(progress.pages) pages go while it is paused")
                        } else {
                            printError("round \(progress.round): \(progress.pages) pages, \(format(Double(progress.bytesSent) / 1_048_576, digits: 1)) MiB sent\(rate)")
                        }
                    }
                }
            }
            if json {
                print(try jsonText(report))
            } else {
                printError("machine \(report.name) moved to \(report.destination): \(report.rounds) rounds, "
                           + "\(format(Double(report.bytesSent) / 1_048_576, digits: 1)) MiB in \(format(report.totalMilliseconds, digits: 0)) ms, "
                           + "paused \(format(report.downtimeMilliseconds, digits: 1)) ms"
                           + (report.postcopyPages.map { ", then \($0) pages after it resumed there (post-copy; \(report.postcopyRequestedPages ?? 0) asked for)" } ?? ""))
            }
        }
    }
}
