import Glibc
import Synchronization
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// Snapshots of a real Linux guest through the library: a shell counts on the console with a
/// sleep between numbers (so the guest's timers, clock and interrupt controllers must all come
/// back right), is paused and snapshotted, and its restores go on counting.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct SnapshotIntegrationTests {
    let dir = TemporaryDirectory()

    static let counter = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo n=$i; sleep 0.05; done"]

    /// Runs `machine` on the test's thread while a helper thread waits until `ready` holds for its
    /// console file, calls `body`, then stops it.
    func whileRunning(_ machine: Machine, console: String, beforeGuestRuns: ((UInt64) throws(SwiftletError) -> Void)? = nil,
                      until ready: @escaping @Sendable (String) -> Bool,
                      _ body: @escaping @Sendable (Machine) throws -> Void) throws -> MachineRunReport {
        let failure = Mutex<String?>(nil)
        let helper = try OSThread.start(name: "test-driver") {
            let deadline = MonotonicClock.now + 90_000_000_000
            while !ready(Self.text(console)) {
                guard MonotonicClock.now < deadline else {
                    var detail = ""
                    if (try? machine.pauseBlocking()) != nil, let live = try? machine.liveMachine() {
                        for vcpu in live.vcpus {
                            let r = try? vcpu.registers(), mp = try? vcpu.mpState()
                            detail += " vCPU \(vcpu.id): RIP \(String(r?.rip ?? 0, radix: 16)) RFLAGS \(String(r?.rflags ?? 0, radix: 16)) \(mp.map { "\($0)" } ?? "?") after \(vcpu.exitCount) exits;"
                        }
                    }
                    failure.withLock { $0 = "timed out:\(detail) console: \(Self.text(console).suffix(300))" }
                    machine.stop()
                    return
                }
                usleep(20_000)
            }
            do { try body(machine) } catch { failure.withLock { $0 = "\(error)" } }
            machine.stop()
        }
        defer { helper.join() }
        let report = try machine.runBlocking(beforeGuestRuns: beforeGuestRuns)
        helper.join()
        if let failure = failure.withLock({ $0 }) { throw SwiftletError(.guestFailure, failure) }
        return report
    }

    static func text(_ path: String) -> String {
        ((try? OwnedFileDescriptor.readSmallTextFile(path, limit: 16 << 20)) ?? "").replacingCRLF
    }

    func consoleFile(_ name: String) -> (String, Int32) {
        let path = dir.path + "/" + name
        return (path, open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644))
    }

    /// The numbers the counter printed, in order.
    static func counts(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { line in line.hasPrefix("n=") ? Int(line.dropFirst(2)) : nil }
    }

    func countsReached(_ n: Int) -> @Sendable (String) -> Bool { { text in (Self.counts(text).last ?? 0) >= n } }

    /// The shell sleeps between numbers, so at the pause the guest is usually idle, waiting for its
    /// TSC-deadline timer: a restore that loses the deadline leaves it halted for good.
    @Test(arguments: [1, 2])
    func linuxGuestContinuesAfterRestoreAndFromADiffOfTheRestoredMachine(cpus: Int) throws {
        let kernel = Subprocess.run([TestHost.swiftletBinary, "kernel", "path"]).stdout.trimmingWhitespace
        let quoted = Self.counter.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ")
        let (originalPath, originalFD) = consoleFile("original.out")
        defer { close(originalFD) }
        let config = MachineConfig(kernelPath: kernel, initrdPath: GuestAssets.defaultInitrd,
                                   commandLine: MachineConfig.defaultCommandLine + " -- " + quoted,
                                   cpuCount: cpus, memoryMiB: 256, consoleOutput: originalFD)
        let full = dir.path + "/full", diff = dir.path + "/diff"
        // Boot, count to 10, pause, snapshot, stop: the original never runs after the snapshot.
        let fullReport = Mutex<SnapshotReport?>(nil)
        _ = try whileRunning(Machine(config: config), console: originalPath, until: countsReached(10)) { machine in
            try machine.pauseBlocking()
            let report = try machine.snapshotBlocking(to: full)
            fullReport.withLock { $0 = report }
        }
        let full1 = try #require(fullReport.withLock { $0 })
        #expect(full1.kind == .full)
        #expect(full1.memoryPagesWritten > 1000, "kernel, initramfs and the shell are in memory")

        // The restore goes on counting where the original stopped, then is snapshotted as a diff.
        let (restoredPath, restoredFD) = consoleFile("restored.out")
        defer { close(restoredFD) }
        let afterFull = Self.counts(Self.text(originalPath)).last ?? 0
        let diffReport = Mutex<SnapshotReport?>(nil)
        _ = try whileRunning(Machine.restoring(from: full, consoleOutput: restoredFD), console: restoredPath,
                             until: countsReached(afterFull + 10)) { machine in
            try machine.pauseBlocking()
            let report = try machine.snapshotBlocking(to: diff, kind: .diff)
            diffReport.withLock { $0 = report }
        }
        let diff1 = try #require(diffReport.withLock { $0 })
        #expect(diff1.kind == .diff)
        #expect(diff1.memoryPagesWritten > 0 && diff1.memoryPagesWritten < full1.memoryPagesWritten)
        let first = Self.text(originalPath) + Self.text(restoredPath)
        let sequence = Self.counts(first)
        #expect(sequence == Array(1...(sequence.last ?? 1)), "one unbroken count across the restore: \(sequence)")

        // And the diff (on top of the full snapshot) restores too.
        let (diffPath, diffFD) = consoleFile("diff.out")
        defer { close(diffFD) }
        let afterDiff = sequence.last ?? 0
        _ = try whileRunning(Machine.restoring(from: diff, consoleOutput: diffFD), console: diffPath,
                             until: countsReached(afterDiff + 5)) { _ in }
        let all = Self.counts(first + Self.text(diffPath))
        #expect(all == Array(1...(all.last ?? 1)), "one unbroken count across both restores: \(all.suffix(30))")
    }
}
