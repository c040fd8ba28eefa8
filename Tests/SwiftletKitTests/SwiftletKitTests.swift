import Glibc
import MachineState
@testable import SwiftletKit
import SwiftletSystem
import Synchronization
import Testing
import TestSupport

/// The use cases without a guest: arguments checked before anything is made, names, the VMM
/// process's invocation, and the snapshot directory's layout.
@Suite struct SwiftletKitTests {
    @Test func theImageEnvironmentGivesWayToTheCommandLines() {
        #expect(ExecDefaults.merge(["PATH=/bin", "A=1", "B"], ["A=2", "C=3"]) == ["PATH=/bin", "B", "A=2", "C=3"])
    }

    @Test func aCommandRequestUsesTheImageDefaultsUnderTheFlags() throws {
        let defaults = ExecDefaults(entrypoint: ["/entry"], command: ["serve"], environment: ["X=1"], workingDirectory: "/app", user: "app")
        let request = try defaults.request(command: [], environment: ["X=2"], workdir: nil, user: "root", what: "image")
        #expect(request.arguments == ["/entry", "serve"] && request.environment == ["X=2"] && request.workingDirectory == "/app" && request.user == "root")
        let empty = ExecDefaults(entrypoint: [], command: [], environment: [], workingDirectory: "/", user: "")
        #expect { try empty.request(command: [], environment: [], workdir: nil, user: nil, what: "the image") } throws: {
            ($0 as! SwiftletError).message == "the image has no entrypoint or command: give one after --"
        }
    }

    @Test func badMachineCreationsAreRefusedBeforeAnythingIsMade() {
        var creation = Machines.Creation(name: "../escape")
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("is not a machine name") }
        creation.name = "ok"
        creation.cpus = 0
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message == "--cpus must be 1 to 254" }
        creation.cpus = 1
        creation.memoryMiB = 8
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("--memory must be at least") }
        creation.memoryMiB = 256
        creation.diskMiB = 1
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("--disk-size") }
        creation.diskMiB = 2048
        creation.root = .snapshot("/tmp/x")
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("`restore` makes one") }
    }

    @Test func onlyTheVMMInvocationIsServed() {
        #expect(MachineServer.serveIfAsked(["run", "--", "true"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine", "serve"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine", "serve", "../bad"]) == ExitStatus.setupFailed)
        #expect(MachineServer.serveIfAsked(["machine", "serve", "ok", "--bogus"]) == ExitStatus.setupFailed)
    }

    @Test func aSnapshotNamesOnlyItsOwnDiskFiles() throws {
        let directory = SnapshotDirectory("/snapshots/a")
        #expect(try directory.diskPath(named: "disk-0") == "/snapshots/a/disk-0")
        #expect(SnapshotDirectory.diskFileName(3) == "disk-3")
        for hostile in ["../disk-0", "/dev/sda", "disk-", "disk-01", "disk--1", "disk-0/../../x", ""] {
            #expect(throws: SwiftletError.self) { try directory.diskPath(named: hostile) }
        }
        #expect(directory.statePath == "/snapshots/a/state" && directory.memoryPath == "/snapshots/a/memory")
    }

    @Test func aMissingSnapshotIsNotRemoved() throws {
        let path = "/tmp/swiftlet-kit-test-\(getpid())"
        #expect(mkdir(path, 0o700) == 0)
        defer { rmdir(path) }
        #expect { try Machines.removeSnapshot(path) } throws: { ($0 as! SwiftletError).message.contains("is not a Swiftlet snapshot") }
        #expect(access(path, F_OK) == 0)
    }

    /// A signalfd record (`struct signalfd_siginfo`, 128 bytes, the signal number first) for `signal`.
    static func signalRecord(_ signal: Int32) -> [UInt8] {
        var record = [UInt8](repeating: 0, count: 128)
        LittleEndian.write(UInt64(signal), 4, into: &record, at: 0)
        return record
    }

    /// Set once by the cancelled work.
    final class Flag: Sendable {
        let raised = Atomic<Bool>(false)
    }

    /// blockingAsync waits in poll for work that needs one of Swift concurrency's cooperative
    /// threads: it is called from threads of its own here (on a two-core host the pool has two
    /// threads, and tests blocking both of them starved the work and hung the run).
    @Test func ctrlCStopsAsyncWorkWithAnInterruptedErrorAndCancelsIt() async throws {
        let signals = try OwnedFileDescriptor.pipe()
        let signalsRead = signals.readEnd.rawValue
        let ended = Flag()
        // A window-size change is not a stop: the work goes on and its result comes back.
        try Self.signalRecord(SIGWINCH).withUnsafeBytes { try signals.writeEnd.writeAll($0) }
        let value = try await OSThread.run(name: "test-blocking") { () throws(SwiftletError) in
            try blockingAsync(interruptions: signalsRead) { () async throws(SwiftletError) -> Int in
                try? await Task.sleep(nanoseconds: 50_000_000)
                return 7
            }
        }
        #expect(value == 7)
        // Ctrl-C: the call returns at once with the signal, and the work is cancelled.
        try Self.signalRecord(SIGINT).withUnsafeBytes { try signals.writeEnd.writeAll($0) }
        let start = MonotonicClock.now
        let interrupted = try await OSThread.run(name: "test-blocking") { () -> Result<Int, SwiftletError> in
            Result { () throws(SwiftletError) in
                try blockingAsync(interruptions: signalsRead) { () async throws(SwiftletError) -> Int in
                    try? await Task.sleep(nanoseconds: 600_000_000_000)
                    ended.raised.store(true, ordering: .releasing)
                    return 0
                }
            }
        }
        guard case .failure(let error) = interrupted else { Issue.record("not interrupted: \(interrupted)"); return }
        #expect(error.code == .interrupted && error.signal == SIGINT, "\(error)")
        while !ended.raised.load(ordering: .acquiring) && MonotonicClock.now - start < 60_000_000_000 {
            try await Task.sleep(nanoseconds: 1_000_000)
        }
        let cancelledWorkEnded = ended.raised.load(ordering: .acquiring)
        #expect(cancelledWorkEnded, "the cancelled work ended instead of sleeping its ten minutes")
        withExtendedLifetime(signals) {}
    }

    @Test func anInterruptedSetupIsARunFailureNamingTheSignal() {
        let failure = CommandRun.Failure.setup(SwiftletError.interrupted(by: SIGTERM))
        #expect(failure.reason == .interrupted(signal: SIGTERM) && failure.message == "interrupted")
        #expect(CommandRun.Failure.setup(SwiftletError(.notFound, "no such image")).reason == .setup)
    }

    /// A home given in the program holds what it makes, and the processes it starts are told.
    @Test func aHomeGivenInTheProgramHoldsItsMachinesAndGoesToItsChildren() throws {
        let home = TemporaryDirectory()
        let rootfs = home.write("rootfs.img", [UInt8](repeating: 0, count: 4096))
        SwiftletHome.use(home.path)
        defer { SwiftletHome.use(nil) }
        #expect(SwiftletHome.path == home.path)
        #expect(currentEnvironment().filter { $0.hasPrefix("SWIFTLET_HOME=") } == ["SWIFTLET_HOME=" + home.path])
        try Machines.create(Machines.Creation(name: "homed", root: .rootfs(rootfs)))
        #expect(access(home.path + "/machines/homed", F_OK) == 0)
        // What Swiftlet keeps there is the user's alone.
        func mode(_ path: String) -> mode_t {
            var info = stat()
            return stat(home.path + path, &info) == 0 ? info.st_mode & 0o7777 : 0
        }
        #expect(mode("/machines") == 0o700 && mode("/machines/homed") == 0o700)
        #expect(mode("/machines/homed/machine.json") == 0o600 && mode("/machines/homed/disk.img") == 0o600)
        #expect(Machines.list().map(\.name) == ["homed"])
        try Machines.remove("homed", force: false)
        #expect(access(home.path + "/machines/homed", F_OK) != 0)
    }
}
