import Devices
import Glibc
import GuestMemory
import Hypervisor
import Synchronization
import MachineState
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// A tiny guest that counts in RBX, stores the count in guest memory at 0x200000 and writes its
/// low byte to the serial port, forever: its console output is 1, 2, 3, ... (mod 256).
struct CountingGuest {
    static let counterAddress: UInt64 = 0x200000
    static let code: [UInt8] = TinyGuest.counter

    let dir = TemporaryDirectory()

    func config(cpus: Int = 1, output: String) -> MachineConfig {
        let kernel = dir.write("counter.elf", TinyGuest.elf(code: Self.code))
        let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        return MachineConfig(kernelPath: kernel, commandLine: "count", cpuCount: cpus, memoryMiB: 64, consoleOutput: fd)
    }

    /// Runs a counting guest until it has printed, and snapshots it into `directory` (then stops it).
    func countThenSnapshot(to directory: String, output: String) throws {
        _ = try Self.whileRunning(Machine(config: config(output: output))) { machine in
            try Self.waitForOutput(output)
            _ = try machine.snapshotBlocking(to: directory)
        }
    }

    /// Runs `machine` on its own thread; `body` gets it while it runs, then it is stopped.
    static func whileRunning(_ machine: Machine, _ body: (Machine) throws -> Void) throws -> MachineRunReport {
        let result = Mutex<Result<MachineRunReport, SwiftletError>?>(nil)
        let thread = try OSThread.start(name: "test-machine") {
            let r = Result { () throws(SwiftletError) in try machine.runBlocking() }
            result.withLock { $0 = r }
        }
        defer {
            machine.stop()
            thread.join()
        }
        try waitUntil { (try? machine.liveMachine()) != nil || result.withLock({ $0 }) != nil }
        try body(machine)
        machine.stop()
        thread.join()
        return try result.withLock { $0 }!.get()
    }

    static func waitUntil(timeout: Double = 20, _ condition: () -> Bool) throws {
        let end = MonotonicClock.now + UInt64(timeout * 1e9)
        while !condition() {
            guard MonotonicClock.now < end else { throw SwiftletError(.systemCall, "timed out waiting") }
            usleep(2000)
        }
    }

    static func fileSize(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : 0
    }

    /// Waits until the console file grows by `bytes`.
    static func waitForOutput(_ path: String, bytes: Int = 200) throws {
        let start = fileSize(path)
        try waitUntil { fileSize(path) >= start + bytes }
    }

    static func output(_ path: String) throws -> [UInt8] {
        try OwnedFileDescriptor.readSmallFile(path, limit: 256 << 20)
    }

    /// The count each byte shows, checked to go up by one every time.
    static func expectConsecutive(_ bytes: [UInt8], startingAt next: UInt64? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
        guard let first = bytes.first else { Issue.record("no output", sourceLocation: sourceLocation); return }
        if let next { #expect(first == UInt8(truncatingIfNeeded: next), "the restored guest goes on with \(next)", sourceLocation: sourceLocation) }
        let broken = bytes.indices.dropLast().first { bytes[$0 + 1] != bytes[$0] &+ 1 }
        #expect(broken == nil, "the count skipped or repeated at byte \(broken ?? 0) of \(bytes.count)", sourceLocation: sourceLocation)
    }

    /// The count stored in a snapshot's memory, and the count the guest prints next, from the
    /// saved RIP and RBX: between the store and the OUT it prints RBX again, elsewhere RBX + 1.
    static func savedCount(_ directory: String) throws -> (stored: UInt64, next: UInt64) {
        let plan = try RestorePlan.load(SnapshotDirectory(directory))
        let memory = try MemoryFile.map(chain: plan.memoryChain, id: plan.snapshot.id)
        let stored = try memory.read(UInt64.self, at: GuestAddress(counterAddress))
        let registers = plan.snapshot.vcpus[0].registers
        let storeDone: Set<UInt64> = [0x100009, 0x100011, 0x100013] // at the store, at `mov al, bl`, at `out`
        let next = storeDone.contains(registers.rip) ? registers.rbx : registers.rbx + 1
        #expect(stored == (registers.rip == 0x100009 ? registers.rbx - 1 : registers.rbx), "memory and registers agree")
        return (stored, next)
    }
}

@Suite(.enabled(if: TestHost.hasKVM, "needs /dev/kvm"), .serialized) struct SnapshotTests {
    @Test(arguments: [1, 2])
    func restoredGuestContinuesCountingWithoutSkippingOrRepeating(cpus: Int) throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/original.out"
        let full = guest.dir.path + "/full", diff = guest.dir.path + "/diff"
        var fullReport: SnapshotReport?
        var diffReport: SnapshotReport?
        let report = try CountingGuest.whileRunning(Machine(config: guest.config(cpus: cpus, output: out))) { machine in
            try CountingGuest.waitForOutput(out)
            fullReport = try machine.snapshotBlocking(to: full)
            try CountingGuest.waitForOutput(out)
            diffReport = try machine.snapshotBlocking(to: diff, kind: .diff)
            try CountingGuest.waitForOutput(out)
        }
        #expect(report.exit == .stopped)
        CountingGuest.expectConsecutive(try CountingGuest.output(out))

        let full1 = try #require(fullReport), diff1 = try #require(diffReport)
        #expect(full1.kind == .full && diff1.kind == .diff)
        #expect(full1.memoryPagesWritten > 2, "code, page tables and the counter")
        #expect(diff1.memoryPagesWritten >= 1 && diff1.memoryPagesWritten < full1.memoryPagesWritten,
                "the diff holds the pages written since the full snapshot (\(diff1.memoryPagesWritten) of \(full1.memoryPagesWritten))")
        let fullCount = try CountingGuest.savedCount(full), diffCount = try CountingGuest.savedCount(diff)
        #expect(fullCount.stored > 0 && diffCount.stored > fullCount.stored)
        let memoryBefore = try FileContents(full + "/memory")

        // Each snapshot restores into a guest that goes on from its own count.
        for (directory, count) in [(full, fullCount), (diff, diffCount)] {
            let restoredOut = guest.dir.path + "/restored-\(count.next).out"
            let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            defer { close(fd) }
            let machine = try Machine.restoring(from: directory, consoleOutput: fd)
            let restored = try CountingGuest.whileRunning(machine) { _ in try CountingGuest.waitForOutput(restoredOut) }
            #expect(restored.exit == .stopped)
            CountingGuest.expectConsecutive(try CountingGuest.output(restoredOut), startingAt: count.next)
        }
        #expect(try memoryBefore.isUnchanged(), "a restore never writes to the snapshot")
    }

    @Test func pauseStopsTheGuestAndResumeContinuesIt() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        _ = try CountingGuest.whileRunning(Machine(config: guest.config(output: out))) { machine in
            try CountingGuest.waitForOutput(out)
            try machine.pauseBlocking()
            usleep(50_000)
            let paused = CountingGuest.fileSize(out)
            usleep(200_000)
            #expect(CountingGuest.fileSize(out) == paused, "no output while paused")
            #expect { try machine.resumeBlocking() ; try machine.resumeBlocking() } throws: {
                ($0 as! SwiftletError).message == "the machine is not paused"
            }
            try CountingGuest.waitForOutput(out)
        }
        CountingGuest.expectConsecutive(try CountingGuest.output(out))
    }

    @Test func concurrentSnapshotsAndPausesTakeTurns() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let results = Mutex<[String]>([])
        _ = try CountingGuest.whileRunning(Machine(config: guest.config(output: out))) { machine in
            try CountingGuest.waitForOutput(out)
            let threads = try (0..<4).map { i in
                try OSThread.start(name: "snap\(i)") {
                    do {
                        if i == 3 {
                            try machine.pauseBlocking()
                            try machine.resumeBlocking()
                            results.withLock { $0.append("paused and resumed") }
                        } else {
                            let report = try machine.snapshotBlocking(to: guest.dir.path + "/s\(i)")
                            results.withLock { $0.append(report.directory) }
                        }
                    } catch {
                        results.withLock { $0.append("error: \(error)") }
                    }
                }
            }
            for thread in threads { thread.join() }
            try CountingGuest.waitForOutput(out)
            #expect(!machine.live.withLock { $0!.controller.isPaused }, "every snapshot resumed what it paused, and only that")
        }
        #expect(results.withLock { $0 }.count == 4)
        #expect(!results.withLock { $0 }.contains { $0.hasPrefix("error") }, "\(results.withLock { $0 })")
        CountingGuest.expectConsecutive(try CountingGuest.output(out))
        for i in 0..<3 {
            let directory = guest.dir.path + "/s\(i)"
            let restoredOut = guest.dir.path + "/r\(i).out"
            let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            defer { close(fd) }
            _ = try CountingGuest.whileRunning(Machine.restoring(from: directory, consoleOutput: fd)) { _ in
                try CountingGuest.waitForOutput(restoredOut)
            }
            CountingGuest.expectConsecutive(try CountingGuest.output(restoredOut), startingAt: try CountingGuest.savedCount(directory).next)
        }
    }

    @Test func badSnapshotRequestsAndBadSnapshotsAreRefusedAndLeaveNothingBehind() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let good = guest.dir.path + "/good"
        let idle = Machine(config: guest.config(output: out))
        #expect { try idle.snapshotBlocking(to: guest.dir.path + "/never") } throws: {
            ($0 as! SwiftletError).message == "the machine is not running"
        }
        _ = try CountingGuest.whileRunning(Machine(config: guest.config(output: out))) { machine in
            try CountingGuest.waitForOutput(out)
            #expect { try machine.snapshotBlocking(to: guest.dir.path + "/d", kind: .diff) } throws: {
                ($0 as! SwiftletError).message.contains("take a full snapshot first")
            }
            _ = try machine.snapshotBlocking(to: good)
            #expect { try machine.snapshotBlocking(to: good) } throws: {
                ($0 as! SwiftletError).message.contains("already exists")
            }
        }
        let entries = Subprocess.run(["/bin/ls", "-A", guest.dir.path]).stdout
        #expect(!entries.contains("partial"), "no half-written snapshot directory: \(entries)")

        let stateBytes = try CountingGuest.output(good + "/state")
        /// What restoring `directory` says: reading it, then building the machine (stopped at
        /// once, so that a snapshot that does restore does not run on).
        func restoreError(_ directory: String) -> String {
            do {
                let machine = try Machine.restoring(from: directory, consoleOutput: nil)
                machine.stop()
                _ = try machine.runBlocking()
                return "restored"
            } catch { return error.message }
        }
        // A flipped byte in the state file.
        let flipped = guest.dir.path + "/flipped"
        _ = Subprocess.run(["/bin/cp", "-r", good, flipped])
        var corrupt = stateBytes
        corrupt[corrupt.count / 2] ^= 0x20
        guest.dir.write("flipped/state", corrupt)
        #expect(restoreError(flipped).contains("is corrupt"))
        // Another format version.
        let future = guest.dir.path + "/future"
        _ = Subprocess.run(["/bin/cp", "-r", good, future])
        var versioned = stateBytes
        versioned[8] = 99
        guest.dir.write("future/state", versioned)
        #expect(restoreError(future).contains("format version 99"))
        // A truncated memory file: refused when the machine starts, before the guest runs.
        let truncated = guest.dir.path + "/truncated"
        _ = Subprocess.run(["/bin/cp", "-r", good, truncated])
        #expect(Glibc.truncate(truncated + "/memory", 8192) == 0)
        let machine = try Machine.restoring(from: truncated, consoleOutput: nil)
        #expect { _ = try machine.runBlocking() } throws: { ($0 as! SwiftletError).message.contains("truncated") }
        // Memory from another snapshot.
        let mixed = guest.dir.path + "/mixed"
        _ = Subprocess.run(["/bin/cp", "-r", good, mixed])
        try guest.countThenSnapshot(to: guest.dir.path + "/other", output: out)
        _ = Subprocess.run(["/bin/cp", guest.dir.path + "/other/memory", mixed + "/memory"])
        #expect { _ = try Machine.restoring(from: mixed, consoleOutput: nil).runBlocking() } throws: {
            ($0 as! SwiftletError).message.contains("do not match")
        }
        // State that claims a device it holds no state for (re-encoded, so its checksum is right).
        let vsock = guest.dir.path + "/vsock"
        _ = Subprocess.run(["/bin/cp", "-r", good, vsock])
        var claimed = try RestorePlan.load(SnapshotDirectory(good)).snapshot
        claimed.hardware.vsockGuestCID = 3
        guest.dir.write("vsock/state", try StateFile.encode(claimed))
        #expect(restoreError(vsock).contains("holds no state for the machine's device virtio-vsock0"))
        // State for a device the machine does not have, and a device's state given to another kind.
        let unknown = guest.dir.path + "/unknown"
        _ = Subprocess.run(["/bin/cp", "-r", good, unknown])
        var extra = try RestorePlan.load(SnapshotDirectory(good)).snapshot
        extra.devices["virtio-net0"] = extra.devices["serial0"]
        guest.dir.write("unknown/state", try StateFile.encode(extra))
        #expect(restoreError(unknown).contains("holds the state of a device \"virtio-net0\" that the machine does not have"))
        let swapped = guest.dir.path + "/swapped"
        _ = Subprocess.run(["/bin/cp", "-r", good, swapped])
        var mismatched = try RestorePlan.load(SnapshotDirectory(good)).snapshot
        mismatched.devices["serial0"] = DeviceState(virtio: nil)
        guest.dir.write("swapped/state", try StateFile.encode(mismatched))
        #expect(restoreError(swapped).contains("the saved state of serial0 is not a serial port's"))
        // Not a snapshot at all.
        #expect(restoreError(guest.dir.path + "/nothing-here") == "snapshot \(guest.dir.path)/nothing-here does not exist")
        #expect(restoreError(guest.dir.path) == "\(guest.dir.path) is not a Swiftlet snapshot: it has no state file")
        // The good snapshot is untouched by all of this and still restores.
        #expect(try CountingGuest.output(good + "/state") == stateBytes)
        let restoredOut = guest.dir.path + "/restored.out"
        let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        _ = try CountingGuest.whileRunning(Machine.restoring(from: good, consoleOutput: fd)) { _ in try CountingGuest.waitForOutput(restoredOut) }
        CountingGuest.expectConsecutive(try CountingGuest.output(restoredOut), startingAt: try CountingGuest.savedCount(good).next)
    }

    @Test func devicesAndDisksComeBackAndUnsupportedOnesAreRefused() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let disk = guest.dir.write("disk.img", [UInt8](repeating: 7, count: 1 << 20))
        var config = guest.config(output: out)
        config.disks = [DiskConfig(path: disk, readOnly: true)]
        config.entropyDevice = true
        let snapshot = guest.dir.path + "/with-devices"
        _ = try CountingGuest.whileRunning(Machine(config: config)) { machine in
            try CountingGuest.waitForOutput(out)
            _ = try machine.snapshotBlocking(to: snapshot)
        }
        let plan = try RestorePlan.load(SnapshotDirectory(snapshot))
        #expect(plan.snapshot.hardware.disks == [SnapshotDisk(path: disk, readOnly: true, size: 1 << 20, file: nil)])
        #expect(plan.snapshot.devices.keys.sorted() == ["serial0", "virtio-blk0", "virtio-rng0"], "the serial port, a block device and an entropy device")
        #expect(plan.snapshot.devices["virtio-blk0"]?.virtio?.deviceType == 2 && plan.snapshot.devices["virtio-rng0"]?.virtio?.deviceType == 4)
        let restoredOut = guest.dir.path + "/restored.out"
        let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        let restored = try Machine.restoring(from: snapshot, consoleOutput: fd, readOnlyDisks: .only([disk]))
        #expect(restored.shape.disks == config.disks && restored.shape.entropyDevice)
        _ = try CountingGuest.whileRunning(restored) { _ in try CountingGuest.waitForOutput(restoredOut) }
        CountingGuest.expectConsecutive(try CountingGuest.output(restoredOut), startingAt: try CountingGuest.savedCount(snapshot).next)

        // The disk changed size since: the guest would see another disk.
        guest.dir.write("disk.img", [UInt8](repeating: 7, count: 2 << 20))
        #expect { try Machine.restoring(from: snapshot, readOnlyDisks: .only([disk])) } throws: {
            ($0 as! SwiftletError).message.contains("but was 1048576 when the snapshot")
        }
        // The disk is gone (an image layer removed from the store): said so, with the way back.
        #expect(unlink(disk) == 0)
        #expect { try Machine.restoring(from: snapshot, readOnlyDisks: .only([disk])) } throws: {
            let message = ($0 as! SwiftletError).message
            return message.contains("the disk \(disk) that the snapshot in") && message.contains("is gone")
        }

        // A writable disk's contents at the snapshot are part of it; later writes are not.
        let content = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 4096 &+ $0) }
        let writableDisk = guest.dir.write("writable.img", content)
        var writable = guest.config(output: out)
        writable.disks = [DiskConfig(path: writableDisk, readOnly: false)]
        let writableSnapshot = guest.dir.path + "/writable"
        _ = try CountingGuest.whileRunning(Machine(config: writable)) { machine in
            try CountingGuest.waitForOutput(out)
            _ = try machine.snapshotBlocking(to: writableSnapshot)
        }
        guest.dir.write("writable.img", [UInt8](repeating: 0xEE, count: 1 << 20))
        let files = try Machine.writableDiskFiles(inSnapshot: writableSnapshot)
        #expect(files == [writableSnapshot + "/disk-0"])
        #expect(try OwnedFileDescriptor.readSmallFile(files[0], limit: 2 << 20) == content)
        #expect(try RestorePlan.load(SnapshotDirectory(writableSnapshot)).snapshot.hardware.disks
                    == [SnapshotDisk(path: writableDisk, readOnly: false, size: 1 << 20, file: "disk-0")])
        // Restored without being told where: a temporary overlay over the snapshot's copy. What
        // the restored machine writes stays out of the snapshot.
        let overlayRestore = try Machine.restoring(from: writableSnapshot, consoleOutput: nil)
        #expect(overlayRestore.shape.disks == [DiskConfig(path: "", readOnly: false, base: files[0])])
        _ = try CountingGuest.whileRunning(overlayRestore) { machine in
            let block = try #require(machine.live.withLock { $0!.devices.drives.first?.device })
            #expect(try DiskContents.all(block.backend) == content)
            try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try block.backend.write(from: $0, at: 0) }
        }
        #expect(try OwnedFileDescriptor.readSmallFile(files[0], limit: 2 << 20) == content)
        // Restored onto a copy the caller made, with a different number of disks refused.
        let copy = guest.dir.path + "/copy.img"
        try FileBlockBackend(path: files[0], readOnly: true).copy(to: copy)
        #expect { try Machine.restoring(from: writableSnapshot, writableDisks: []) } throws: {
            ($0 as! SwiftletError).message.contains("has 1 writable disks, but 0 were given")
        }
        let copyRestore = try Machine.restoring(from: writableSnapshot, consoleOutput: nil, writableDisks: [DiskConfig(path: copy)])
        #expect(copyRestore.shape.disks == [DiskConfig(path: copy, readOnly: false)])
        // A damaged disk copy (another size) is refused.
        guest.dir.write("writable/disk-0", [1, 2, 3])
        #expect { try Machine.restoring(from: writableSnapshot) } throws: {
            ($0 as! SwiftletError).message.contains("the snapshot is damaged")
        }

        // A vsock device comes back with its guest CID, and the annotations with the snapshot.
        var withVsock = guest.config(output: out)
        withVsock.vsock = VsockConfig(guestCID: 7)
        let vsockSnapshot = guest.dir.path + "/vsock"
        _ = try CountingGuest.whileRunning(Machine(config: withVsock)) { machine in
            try CountingGuest.waitForOutput(out)
            _ = try machine.snapshotBlocking(to: vsockSnapshot, annotations: ["maker": "test"])
        }
        let vsockRestored = try Machine.restoring(from: vsockSnapshot, consoleOutput: nil)
        #expect(vsockRestored.shape.vsock == VsockConfig(guestCID: 7))
        #expect(vsockRestored.restoredAnnotations == ["maker": "test"])
    }

    /// Forked copies each continue the count from the fork's snapshot, and each writes its own
    /// disk overlay without the others or the snapshot seeing it.
    @Test func anEmptyDriveComesBackEmptyAndTakesADiskAfterTheRestore() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let content = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let disk = guest.dir.write("layer.img", content)
        var config = guest.config(output: out)
        config.disks = [.empty, .empty]
        let template = guest.dir.path + "/template"
        _ = try CountingGuest.whileRunning(Machine(config: config)) { machine in
            try CountingGuest.waitForOutput(out)
            _ = try machine.snapshotBlocking(to: template)
        }
        #expect(try RestorePlan.load(SnapshotDirectory(template)).snapshot.hardware.disks
                    == [SnapshotDisk(path: "", readOnly: true, size: 0, file: nil), SnapshotDisk(path: "", readOnly: true, size: 0, file: nil)])

        let restored = try Machine.restoring(from: template, consoleOutput: nil)
        #expect(restored.shape.disks == [.empty, .empty])
        #expect(throws: SwiftletError.self, "no machine runs yet") { try restored.insertDisk(at: 0, DiskConfig(path: disk, readOnly: true)) }
        let after = guest.dir.path + "/after"
        _ = try CountingGuest.whileRunning(restored) { machine in
            try CountingGuest.waitUntil { (try? machine.liveMachine()) != nil }
            let refusals: [(Int, DiskConfig, String)] = [
                (2, DiskConfig(path: disk, readOnly: true), "no disk drive 2"),
                (0, DiskConfig(path: disk, readOnly: false), "only a read-only disk image"),
                (0, .empty, "only a read-only disk image"),
                (0, DiskConfig(path: guest.dir.path + "/missing.img", readOnly: true), "missing.img"),
            ]
            for (index, disk, message) in refusals {
                let error = #expect(throws: SwiftletError.self) { try machine.insertDisk(at: index, disk) }
                #expect(error?.message.contains(message) == true, "\(String(describing: error))")
            }
            try machine.insertDisk(at: 1, DiskConfig(path: disk, readOnly: true))
            let drives = machine.live.withLock { $0!.devices.drives.map(\.device) }
            #expect(drives.map(\.capacitySectors) == [0, 2048])
            #expect(try DiskContents.all(drives[1].backend) == content)
            let error = #expect(throws: SwiftletError.self) { try machine.insertDisk(at: 1, DiskConfig(path: disk, readOnly: true)) }
            #expect(error?.message.contains("already holds a disk") == true)
            // A snapshot taken now records the disk where the drive was empty.
            _ = try machine.snapshotBlocking(to: after)
        }
        #expect(try RestorePlan.load(SnapshotDirectory(after)).snapshot.hardware.disks
                    == [SnapshotDisk(path: "", readOnly: true, size: 0, file: nil), SnapshotDisk(path: disk, readOnly: true, size: 1 << 20, file: nil)])
        #expect(try Machine.restoring(from: after, consoleOutput: nil, readOnlyDisks: .only([disk])).shape.disks
                    == [.empty, DiskConfig(path: disk, readOnly: true)])
    }

    @Test func forkedCopiesContinueTheCountAndDivergeOnTheirOwnDisks() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let content = [UInt8](repeating: 0x11, count: 1 << 20)
        var config = guest.config(output: out)
        config.disks = [DiskConfig(path: guest.dir.write("disk.img", content), readOnly: false)]
        let snapshot = guest.dir.path + "/fork"
        var copies: [Machine] = []
        _ = try CountingGuest.whileRunning(Machine(config: config)) { machine in
            try CountingGuest.waitForOutput(out)
            #expect { try machine.forkBlocking(count: 0, snapshotDirectory: snapshot) } throws: {
                ($0 as! SwiftletError).message.contains("at least one copy")
            }
            copies = try machine.forkBlocking(count: 3, snapshotDirectory: snapshot) { index in
                Machine.ForkOptions(consoleOutput: open(guest.dir.path + "/copy-\(index).out", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644))
            }
            try CountingGuest.waitForOutput(out) // the source goes on
        }
        #expect(copies.count == 3)
        let next = try CountingGuest.savedCount(snapshot).next
        for (index, copy) in copies.enumerated() {
            let copyOut = guest.dir.path + "/copy-\(index).out"
            _ = try CountingGuest.whileRunning(copy) { machine in
                try CountingGuest.waitForOutput(copyOut)
                let block = try #require(machine.live.withLock { $0!.devices.drives.first?.device })
                #expect(try DiskContents.all(block.backend) == content, "copy \(index) sees the disk as it was, not its siblings' writes")
                try [UInt8](repeating: UInt8(index), count: 4096).withUnsafeBytes { try block.backend.write(from: $0, at: 0) }
            }
            CountingGuest.expectConsecutive(try CountingGuest.output(copyOut), startingAt: next)
        }
        #expect(try OwnedFileDescriptor.readSmallFile(snapshot + "/disk-0", limit: 2 << 20) == content)
    }

    /// A restore that will not be diffed skips dirty tracking; a diff of it is refused, a full
    /// snapshot still works and restores.
    @Test func aRestoreWithoutDiffTrackingCanOnlyBeSnapshottedInFull() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let first = guest.dir.path + "/first", second = guest.dir.path + "/second"
        try guest.countThenSnapshot(to: first, output: out)
        let restoredOut = guest.dir.path + "/restored.out"
        let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        _ = try CountingGuest.whileRunning(Machine.restoring(from: first, consoleOutput: fd, diffable: false)) { machine in
            try CountingGuest.waitForOutput(restoredOut)
            #expect(machine.live.withLock { $0!.dirtyLogging } == false)
            #expect { try machine.snapshotBlocking(to: second, kind: .diff) } throws: {
                ($0 as! SwiftletError).message.contains("needs an earlier snapshot")
            }
            _ = try machine.snapshotBlocking(to: second)
        }
        #expect(try RestorePlan.load(SnapshotDirectory(second)).snapshot.kind == .full)
        let againOut = guest.dir.path + "/again.out"
        let again = open(againOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(again) }
        _ = try CountingGuest.whileRunning(Machine.restoring(from: second, consoleOutput: again)) { _ in try CountingGuest.waitForOutput(againOut) }
        CountingGuest.expectConsecutive(try CountingGuest.output(againOut), startingAt: try CountingGuest.savedCount(second).next)
    }

    @Test func theFirstRestoreRecordsItsWorkingSetAndLaterOnesCopyItIn() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let snapshot = guest.dir.path + "/snapshot"
        try guest.countThenSnapshot(to: snapshot, output: out)
        let snapshotFiles = try ["state", "memory"].map { try FileContents(snapshot + "/" + $0) }
        let setPath = snapshot + "/" + WorkingSet.fileName
        let plan = try RestorePlan.load(SnapshotDirectory(snapshot))
        func restore(prefetch: Bool, _ body: (Machine) throws -> Void) throws {
            let restoredOut = guest.dir.path + "/restored.out"
            let fd = open(restoredOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            defer { close(fd) }
            _ = try CountingGuest.whileRunning(Machine.restoring(from: snapshot, consoleOutput: fd, diffable: false, prefetchWorkingSet: prefetch)) { machine in
                try CountingGuest.waitForOutput(restoredOut)
                try body(machine)
            }
            CountingGuest.expectConsecutive(try CountingGuest.output(restoredOut), startingAt: try CountingGuest.savedCount(snapshot).next)
        }
        // Without prefetching there is nothing to record.
        try restore(prefetch: false) { machine throws in #expect(try machine.saveWorkingSet() == nil) }
        #expect(access(setPath, F_OK) != 0)

        // The first restore records the pages it wrote: the counter's among them.
        try restore(prefetch: true) { machine throws in
            let pages = try #require(try machine.saveWorkingSet())
            #expect(pages >= 1)
            #expect(try machine.saveWorkingSet() == nil, "recorded once")
        }
        let recorded = try WorkingSet.decode(CountingGuest.output(setPath), path: setPath, snapshot: plan.snapshot.id, pageCount: 64 << 8)
        let counterPage = Int(CountingGuest.counterAddress / 4096)
        #expect(recorded.runs.contains { $0.contains(counterPage) }, "\(recorded.runs)")

        // The next finds it, copies it in and records nothing; the guest goes on counting.
        try restore(prefetch: true) { machine throws in
            #expect(machine.workingSetLoaded.withLock { $0 })
            // The copying runs beside the guest: wait for it.
            let memory = try machine.liveMachine().memory
            try CountingGuest.waitUntil {
                guard let runs = try? memory.writtenPageRuns() else { return false }
                let copied = Set(runs.flatMap { Array($0) })
                return recorded.runs.allSatisfy { $0.allSatisfy(copied.contains) }
            }
            #expect(try machine.saveWorkingSet() == nil)
        }
        // A damaged working set is only a missing hint: the restore works and records a new one.
        var damaged = try CountingGuest.output(setPath)
        damaged[damaged.count - 1] ^= 0xFF
        try OwnedFileDescriptor.writeSmallFileAtomically(setPath, damaged)
        try restore(prefetch: true) { machine throws in
            #expect(!machine.workingSetLoaded.withLock { $0 })
            #expect(try machine.saveWorkingSet() != nil)
        }
        #expect(try WorkingSet.decode(CountingGuest.output(setPath), path: setPath, snapshot: plan.snapshot.id, pageCount: 64 << 8).pages >= 1)
        #expect(try snapshotFiles.allSatisfy { try $0.isUnchanged() },
                "the snapshot's own files are never written")
        let files = (OwnedFileDescriptor.directoryEntries(snapshot) ?? []).map(\.name).sorted()
        #expect(files == ["memory", "state", WorkingSet.fileName], "no temporary file is left: \(files)")

        // A first run that writes more than a quarter of memory records an empty set: later runs
        // neither copy nor record.
        unlink(setPath)
        try restore(prefetch: true) { machine throws in
            try machine.liveMachine().memory.fill(zero: 20 << 20, at: GuestAddress(32 << 20)) // the guest never goes there
            #expect(try machine.saveWorkingSet() == 0)
        }
        #expect(try WorkingSet.decode(CountingGuest.output(setPath), path: setPath, snapshot: plan.snapshot.id, pageCount: 64 << 8).runs.isEmpty)
        try restore(prefetch: true) { machine throws in
            #expect(machine.workingSetLoaded.withLock { $0 })
            #expect(try machine.saveWorkingSet() == nil)
        }
    }

    /// A diff that fails (here: its filesystem is full) after taking the dirty logs must not lose
    /// those pages: the next diff still holds them.
    @Test(.enabled(if: TestHost.isRoot, "mounts a small tmpfs"))
    func aFailedDiffLeavesItsPagesToTheNextOne() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let small = guest.dir.path + "/small"
        _ = Subprocess.run(["/bin/mkdir", small])
        try #require(Subprocess.run(["/bin/mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", small]).status == 0, "needs to mount a tmpfs")
        defer { _ = Subprocess.run(["/bin/umount", small]) }
        let full = guest.dir.path + "/full", diff = guest.dir.path + "/diff"
        let marker = GuestAddress(0x300000)
        let pattern = Array("written once, before the failed diff".utf8)
        _ = try CountingGuest.whileRunning(Machine(config: guest.config(output: out))) { machine in
            try CountingGuest.waitForOutput(out)
            _ = try machine.snapshotBlocking(to: full)
            try machine.pauseBlocking()
            // A device-style write to a page nothing else touches.
            try machine.live.withLock { $0! }.memory.write(pattern, at: marker)
            #expect { try machine.snapshotBlocking(to: small + "/diff", kind: .diff) } throws: { _ in true }
            let report = try machine.snapshotBlocking(to: diff, kind: .diff)
            #expect(report.kind == .diff)
            try machine.resumeBlocking()
        }
        let plan = try RestorePlan.load(SnapshotDirectory(diff))
        let memory = try MemoryFile.map(chain: plan.memoryChain, id: plan.snapshot.id)
        #expect(try memory.read(count: pattern.count, at: marker) == pattern, "the page the failed diff took is in the next diff")
    }

    /// A Linux guest's snapshot is refused on a PVM-backed /dev/kvm, as its boot is.
    @Test func aLinuxSnapshotOnPVMIsRefusedWithAnExplanation() throws {
        let guest = CountingGuest()
        let out = guest.dir.path + "/out"
        let tiny = guest.dir.path + "/tiny"
        try guest.countThenSnapshot(to: tiny, output: out)
        #expect(try RestorePlan.load(SnapshotDirectory(tiny)).snapshot.guestIsLinux == false)
        // The same snapshot, said to be of a Linux guest (re-encoded, so its checksum is right).
        let linux = guest.dir.path + "/linux"
        _ = Subprocess.run(["/bin/cp", "-r", tiny, linux])
        var snapshot = try RestorePlan.load(SnapshotDirectory(tiny)).snapshot
        snapshot.guestIsLinux = true
        guest.dir.write("linux/state", try StateFile.encode(snapshot))
        let machine = try Machine.restoring(from: linux, consoleOutput: nil)
        if TestHost.isPVM {
            #expect { _ = try machine.runBlocking() } throws: {
                let e = $0 as! SwiftletError
                return e.code == .unsupported && e.message.contains("PVM") && e.message.contains("hardware KVM")
            }
        }
        // Allowed (or on hardware KVM, where nothing refuses it), the guest runs on from its snapshot.
        let resumedOut = guest.dir.path + "/resumed.out"
        let fd = open(resumedOut, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        _ = try CountingGuest.whileRunning(Machine.restoring(from: linux, consoleOutput: fd, allowPVM: true)) { _ in
            try CountingGuest.waitForOutput(resumedOut)
        }
        CountingGuest.expectConsecutive(try CountingGuest.output(resumedOut), startingAt: try CountingGuest.savedCount(tiny).next)
    }

    @Test func aGuestThatSawCPUFeaturesThisHostLacksIsRefused() throws {
        let entry = CPUIDEntry(function: 7, ebx: 1 << 5)
        let snapshot = MachineSnapshot(
            id: .init(bytes: Array(repeating: 1, count: 16)), kind: .full, parent: nil, parentDirectory: nil, createdAt: 0,
            hardware: SnapshotHardware(MachineShape(cpuCount: 1, memoryMiB: 64, disks: [], entropyDevice: false, vsock: nil), diskSizes: []), guestIsLinux: false,
            cpuid: [[entry]], vcpus: [],
            vm: VMState(interruptControllers: [], pit: nil, clock: 0, clockRealtime: nil),
            devices: ["serial0": DeviceState(serial: .reset)], annotations: [:])
        let plan = RestorePlan(snapshot: snapshot, directory: SnapshotDirectory("/snap"), memoryChain: [])
        #expect { try plan.checkCPU(supported: [CPUIDEntry(function: 7, ebx: 0)]) } throws: {
            let message = ($0 as! SwiftletError).message
            return message.contains("CPUID 0x7.0 EBX bit 5") && message.contains("same or a newer CPU")
        }
        #expect(throws: Never.self) { try plan.checkCPU(supported: [CPUIDEntry(function: 7, ebx: 0xFF)]) }
    }
}

enum DiskContents {
    /// Every byte of a disk, read through its backend.
    static func all(_ backend: any BlockBackend) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(backend.byteCount))
        try bytes.withUnsafeMutableBytes { try backend.read(into: $0, at: 0) }
        return bytes
    }
}
