import Glibc
import Hypervisor
import MachineState
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

/// A snapshot directory is untrusted input: whatever its state file says about the disks, a
/// restore opens only regular `disk-N` files in the snapshot's directory for writable disks, and
/// read-only disks only where its caller's resolver says. Each crafted state is refused with a
/// clear message, and the snapshot is left as it was. (No guest runs: the disks are checked
/// before a machine is made, so this needs no KVM.)
@Suite struct SnapshotDiskTrustTests {
    let dir = TemporaryDirectory()

    /// A snapshot directory `name` whose state has `disks` (and no vCPUs or memory: a restore of
    /// it would fail later, but its disks are checked first).
    func snapshot(_ name: String, disks: [SnapshotDisk]) throws -> String {
        let path = dir.path + "/" + name
        #expect(mkdir(path, 0o700) == 0)
        let shape = MachineShape(cpuCount: 0, memoryMiB: 64, disks: [], entropyDevice: false, vsock: nil,
                                 kvmPath: "/dev/kvm", allowPVM: false, consoleOutput: nil, consoleInput: nil)
        var hardware = SnapshotHardware(shape, diskSizes: [])
        hardware.disks = disks
        let state = MachineSnapshot(id: try SnapshotID.random(), kind: .full, parent: nil, parentDirectory: nil, createdAt: 0,
                                    hardware: hardware, guestIsLinux: false, cpuid: [], vcpus: [],
                                    vm: VMState(interruptControllers: [], pit: nil, clock: 0, clockRealtime: nil),
                                    devices: [:], annotations: [:])
        _ = dir.write(name + "/state", try StateFile.encode(state), mode: 0o600)
        return path
    }

    /// The error a restore of `snapshot` gives (nil if it was accepted); the snapshot's state file
    /// is the same afterwards.
    func restoreError(_ snapshot: String, readOnlyDisks: SnapshotDiskResolver = .none) throws -> String? {
        let before = try OwnedFileDescriptor.readSmallFile(snapshot + "/state")
        defer { #expect((try? OwnedFileDescriptor.readSmallFile(snapshot + "/state")) == before) }
        do {
            _ = try Machine.restoring(from: snapshot, consoleOutput: nil, readOnlyDisks: readOnlyDisks)
            return nil
        } catch {
            return error.message
        }
    }

    @Test func aDiskFileNamedOutsideTheSnapshotIsRefused() throws {
        _ = dir.write("x", [UInt8](repeating: 7, count: 4096))
        for (index, name) in ["../../x", "../x", dir.path + "/x", "/dev/sda", "disk-0/../../x", "disk-00"].enumerated() {
            let snapshot = try snapshot("named\(index)", disks: [SnapshotDisk(path: "", readOnly: false, size: 4096, file: name)])
            let message = try restoreError(snapshot)
            #expect(message?.contains("names a disk file \(name.debugDescription), which is not a disk file of a snapshot") == true, "\(name): \(message ?? "accepted")")
            #expect(throws: SwiftletError.self) { try Machine.writableDiskFiles(inSnapshot: snapshot) }
        }
    }

    @Test func aWritableDiskNamedByAHostPathIsRefused() throws {
        // /dev/null: a device whose size (0) the old size check let through, opened read-write.
        let host = dir.write("host.img", [UInt8](repeating: 1, count: 4096))
        for (index, (path, size)) in [("/dev/null", UInt64(0)), (host, 4096)].enumerated() {
            let snapshot = try snapshot("host\(index)", disks: [SnapshotDisk(path: path, readOnly: false, size: size, file: nil)])
            #expect(try restoreError(snapshot, readOnlyDisks: .only([path]))
                        == "the snapshot in \(snapshot) names a writable disk by a host path (\(path)), which is refused: a snapshot holds its writable disks' contents in its own directory")
        }
        #expect(try OwnedFileDescriptor.readSmallFile(host) == [UInt8](repeating: 1, count: 4096))
    }

    @Test func aDiskFileThatIsALinkADeviceOrOfAnotherSizeIsRefused() throws {
        let outside = dir.write("outside.img", [UInt8](repeating: 9, count: 4096))
        let linked = try snapshot("linked", disks: [SnapshotDisk(path: "", readOnly: false, size: 4096, file: "disk-0")])
        #expect(symlink(outside, linked + "/disk-0") == 0)
        #expect(try restoreError(linked)?.contains("\(linked)/disk-0 is a symbolic link, which is refused") == true)
        #expect(throws: SwiftletError.self) { try Machine.writableDiskFiles(inSnapshot: linked) }

        let device = try snapshot("device", disks: [SnapshotDisk(path: "", readOnly: false, size: 0, file: "disk-0")])
        #expect(symlink("/dev/null", device + "/disk-0") == 0)
        #expect(try restoreError(device)?.contains("is a symbolic link, which is refused") == true)

        let fifo = try snapshot("fifo", disks: [SnapshotDisk(path: "", readOnly: false, size: 0, file: "disk-0")])
        #expect(mkfifo(fifo + "/disk-0", 0o600) == 0)
        #expect(try restoreError(fifo)?.contains("\(fifo)/disk-0 is not a regular file") == true)

        let resized = try snapshot("resized", disks: [SnapshotDisk(path: "", readOnly: false, size: 8192, file: "disk-0")])
        _ = dir.write("resized/disk-0", [UInt8](repeating: 0, count: 4096))
        #expect(try restoreError(resized) == "\(resized)/disk-0 is 4096 bytes, but the disk it holds was 8192: the snapshot is damaged")

        let good = try snapshot("good", disks: [SnapshotDisk(path: "/anywhere", readOnly: false, size: 4096, file: "disk-0")])
        _ = dir.write("good/disk-0", [UInt8](repeating: 0, count: 4096))
        #expect(try restoreError(good) == nil)
        #expect(try Machine.writableDiskFiles(inSnapshot: good) == [good + "/disk-0"])
        #expect(try OwnedFileDescriptor.readSmallFile(outside) == [UInt8](repeating: 9, count: 4096))
    }

    @Test func readOnlyDisksAreOpenedOnlyWhereTheResolverSays() throws {
        let layer = dir.write("layer.erofs", [UInt8](repeating: 3, count: 4096))
        let snapshot = try snapshot("layered", disks: [SnapshotDisk(path: layer, readOnly: true, size: 4096, file: nil)])
        // By default none: the state's path is not opened.
        #expect(try restoreError(snapshot) == "cannot restore the snapshot in \(snapshot): the snapshot names the read-only disk \(layer), and this restore was given no disks that a snapshot may name")
        #expect(try restoreError(snapshot, readOnlyDisks: .only(["/other"]))?.contains("which is not one of the disks this restore may open") == true)
        let accepted = try Machine.restoring(from: snapshot, consoleOutput: nil, readOnlyDisks: .only([layer]))
        #expect(accepted.shape.disks == [DiskConfig(path: layer, readOnly: true)])
        // A resolver maps the recorded path to the file to open (an image layer found by digest, say).
        let local = dir.write("local.erofs", [UInt8](repeating: 4, count: 4096))
        let mapped = try Machine.restoring(from: snapshot, consoleOutput: nil, readOnlyDisks: SnapshotDiskResolver { _ in local })
        #expect(mapped.shape.disks == [DiskConfig(path: local, readOnly: true)])

        // A read-only disk that is a device (st_size 0 matched the old size check) or of another size.
        let device = try self.snapshot("device-ro", disks: [SnapshotDisk(path: "/dev/null", readOnly: true, size: 0, file: nil)])
        #expect(try restoreError(device, readOnlyDisks: .only(["/dev/null"]))
                    == "the disk /dev/null that the snapshot in \(device) names is not a regular file (a device or FIFO), which is refused")
        let resized = try self.snapshot("resized-ro", disks: [SnapshotDisk(path: layer, readOnly: true, size: 8192, file: nil)])
        #expect(try restoreError(resized, readOnlyDisks: .only([layer]))?.contains("is 4096 bytes, but was 8192") == true)
        // A read-only disk cannot carry a file of its own.
        let mixed = try self.snapshot("mixed", disks: [SnapshotDisk(path: layer, readOnly: true, size: 4096, file: "disk-0")])
        _ = dir.write("mixed/disk-0", [UInt8](repeating: 0, count: 4096))
        #expect(try restoreError(mixed, readOnlyDisks: .only([layer]))?.contains("describes a read-only disk with a file in the snapshot") == true)
    }
}
