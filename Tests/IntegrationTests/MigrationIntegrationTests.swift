import Glibc
import MachineState
import Synchronization
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// Live migration through the library, source and destination in one process joined by a
/// socket pair: a shell counting on the console moves without a gap or a repeat, and a
/// migration the destination refuses leaves the source counting.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct MigrationIntegrationTests {
    let dir = TemporaryDirectory()
    let snapshots = SnapshotIntegrationTests()

    /// The destination's side on a thread of its own: receives into `directory`, restores with
    /// its console on `console` (a file at `consolePath`), builds the machine, takes it over
    /// from the source and runs it until its console shows 10 numbers. `result` holds the run's
    /// report (or the error) once `thread` ended.
    final class Destination: Sendable {
        final class Outcome: Sendable { let value = Mutex<Result<MachineRunReport, SwiftletError>?>(nil) }
        let outcome = Outcome()
        let thread: OSThread
        var result: Result<MachineRunReport, SwiftletError>? { outcome.value.withLock { $0 } }

        init(socket: Int32, token: [UInt8], directory: String, console: Int32, consolePath: String) throws {
            let outcome = self.outcome
            thread = try OSThread.start(name: "destination") {
                do throws(SwiftletError) {
                    let incoming = try Machine.receiveMigration(over: socket, token: token, into: directory) { arrived throws(SwiftletError) in
                        try Machine.restoring(from: arrived.directory, consoleOutput: console, lazyMemory: arrived.lazyMemory)
                    }
                    let machine = incoming.machine
                    let watcher = try OSThread.start(name: "destination-watch") {
                        let deadline = MonotonicClock.now + 90_000_000_000
                        while SnapshotIntegrationTests.counts(SnapshotIntegrationTests.text(consolePath)).count < 10 && MonotonicClock.now < deadline {
                            usleep(20_000)
                        }
                        machine.stop()
                    }
                    defer { machine.stop(); watcher.join() }
                    let report = try machine.runBlocking(beforeGuestRuns: { _ throws(SwiftletError) in
                        try incoming.takeOver()
                        incoming.confirmRunning()
                    })
                    outcome.value.withLock { $0 = .success(report) }
                } catch {
                    outcome.value.withLock { $0 = .failure(error) }
                }
            }
        }
    }

    @Test func aCountingGuestMovesWithoutAGapOrARepeatAndARefusedMoveLeavesItRunning() throws {
        let kernel = Subprocess.run([TestHost.swiftletBinary, "kernel", "path"]).stdout.trimmingWhitespace
        let quoted = SnapshotIntegrationTests.counter.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ")
        let (sourcePath, sourceFD) = snapshots.consoleFile("source.out")
        defer { close(sourceFD) }
        let (destinationPath, destinationFD) = snapshots.consoleFile("destination.out")
        defer { close(destinationFD) }
        let config = MachineConfig(kernelPath: kernel, initrdPath: GuestAssets.defaultInitrd,
                                   commandLine: MachineConfig.defaultCommandLine + " -- " + quoted,
                                   cpuCount: 1, memoryMiB: 128, consoleOutput: sourceFD)
        let token = try MigrationChannel.newToken()
        let refused = Mutex<SwiftletError?>(nil)
        let countAfterRefusal = Mutex<Int>(0)
        let migrated = Mutex<MigrationReport?>(nil)
        let destination = Mutex<Destination?>(nil)
        let wrongDirectory = dir.path + "/wrong", directory = dir.path + "/received"
        let report = try snapshots.whileRunning(Machine(config: config), console: sourcePath, until: snapshots.countsReached(10)) { machine in
            // A destination expecting another token: refused, and the source goes on counting.
            let first = try UnixSocket.pair()
            let wrong = try Destination(socket: first.second.rawValue, token: try MigrationChannel.newToken(),
                                        directory: wrongDirectory, console: destinationFD, consolePath: destinationPath)
            do throws(SwiftletError) { _ = try machine.migrate(over: first.first.rawValue, token: token) } catch { refused.withLock { $0 = error } }
            UnixSocket.shutdown(first.first.rawValue, .both)
            wrong.thread.join()
            if case .success? = wrong.result { throw SwiftletError(.guestFailure, "the wrong token was taken") }
            let now = SnapshotIntegrationTests.counts(SnapshotIntegrationTests.text(sourcePath)).last ?? 0
            let deadline = MonotonicClock.now + 60_000_000_000
            while (SnapshotIntegrationTests.counts(SnapshotIntegrationTests.text(sourcePath)).last ?? 0) < now + 5 {
                guard MonotonicClock.now < deadline else { throw SwiftletError(.guestFailure, "the source stopped counting after the refused migration") }
                usleep(20_000)
            }
            countAfterRefusal.withLock { $0 = now + 5 }

            // The real one.
            let second = try UnixSocket.pair()
            let receiving = try Destination(socket: second.second.rawValue, token: token, directory: directory, console: destinationFD,
                                            consolePath: destinationPath)
            destination.withLock { $0 = receiving }
            // This test bundle is a debug build, in an emulated CPU: the copying is slow, so the pause aimed for is long.
            let done = try machine.migrate(over: second.first.rawValue, token: token, options: MigrationOptions(maximumDowntimeMilliseconds: 30_000)) { progress in
                print("migration round \(progress.round): \(progress.pages) pages, \(progress.bytesSent) bytes sent")
            }
            migrated.withLock { $0 = done }
            receiving.thread.join()
        }
        #expect(report.exit == .migrated)
        let refusal = try #require(refused.withLock { $0 })
        #expect(refusal.description.contains("token"), "\(refusal)")
        #expect(access(wrongDirectory, F_OK) != 0, "a refused migration leaves nothing on the destination")
        #expect(countAfterRefusal.withLock { $0 } > 10)
        let done = try #require(migrated.withLock { $0 })
        #expect(done.rounds.count >= 1 && done.rounds[0].pages > 1000, "the first round sends the guest's memory: \(done)")

        let receiving = try #require(destination.withLock { $0 })
        let arrived = try #require(receiving.result).get()
        #expect(arrived.exit == .stopped, "the destination ran the machine until the test stopped it: \(arrived.exit)")
        let all = SnapshotIntegrationTests.counts(SnapshotIntegrationTests.text(sourcePath) + SnapshotIntegrationTests.text(destinationPath))
        #expect(all == Array(1...(all.last ?? 1)), "one unbroken count across the migration: \(all.suffix(30))")
    }
}
