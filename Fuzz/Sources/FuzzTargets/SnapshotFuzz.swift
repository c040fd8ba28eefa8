import Glibc
import GuestMemory
import Hypervisor
import MachineState
import SwiftletNet
import SwiftletSystem
import Virtio
@testable import Devices
@testable import VMM

/// A snapshot's state file as a restore reads it. The input is the state payload; the target
/// writes it with a valid header and checksum (a crafted snapshot has one), then reads it the way
/// a restore does and checks it against this host's (empty) CPU features.
enum SnapshotStateFuzz {
    static func run(_ bytes: [UInt8]) {
        let directory = Scratch.directory + "/state"
        mkdir(directory, 0o700)
        _ = Scratch.write(StateFile.header(for: bytes) + bytes, to: "state/" + SnapshotDirectory.stateFileName)
        guard let snapshot = try? RestorePlan.readState(SnapshotDirectory(directory)) else { return }
        let plan = RestorePlan(snapshot: snapshot, directory: SnapshotDirectory(directory), memoryChain: [])
        _ = try? plan.checkCPU(supported: [])
        // The NIC a restore would build (with a backend when the state has a NIC, and without):
        // never one with an MTU a device cannot have.
        let given = NetworkDeviceConfig(policy: NetworkConfiguration(allowAll: true), backend: -1)
        for backend in [given, nil] {
            if let nic = try? plan.checkedNetwork(backend) {
                precondition(nic.guest.mtu >= Int(VirtioNet.minimumMTU) && nic.guest.mtu <= Int(UInt16.max), "a NIC with MTU \(nic.guest.mtu) was accepted")
            }
        }
        // A writable disk's file is only ever a file in the snapshot's own directory.
        for disk in snapshot.hardware.disks where disk.file != nil {
            if let path = try? plan.checkedWritableDisk(disk) {
                precondition(path.hasPrefix(directory + "/") && !path.dropFirst(directory.count + 1).contains("/"),
                             "a writable disk outside the snapshot's directory was accepted: \(path)")
            }
        }
    }

    /// States written by the code (`StateFile.encode` drops the header the target adds back).
    static func seeds() throws -> [[UInt8]] {
        func state(cpus: Int, disks: [SnapshotDisk], devices: [String: DeviceState], diff: Bool, network: SnapshotNetwork? = nil) throws -> [UInt8] {
            var hardware = SnapshotHardware(MachineShape(cpuCount: cpus, memoryMiB: 64, disks: [], entropyDevice: true, vsock: nil), diskSizes: [])
            hardware.disks = disks
            hardware.network = network
            let snapshot = MachineSnapshot(
                id: SnapshotID(bytes: Array(repeating: 7, count: 16)), kind: diff ? .diff : .full, parent: diff ? SnapshotID(bytes: Array(repeating: 6, count: 16)) : nil,
                parentDirectory: diff ? "/nonexistent/parent" : nil, createdAt: 1_700_000_000_000_000_000, hardware: hardware, guestIsLinux: true,
                cpuid: (0..<cpus).map { _ in [CPUIDEntry(function: 1, ecx: 1 << 31), CPUIDEntry(function: 7, ebx: 1 << 5)] }, vcpus: [],
                vm: VMState(interruptControllers: [[1, 2, 3]], pit: [4, 5], clock: 123, clockRealtime: 456),
                devices: devices, annotations: ["command": "/bin/sh"])
            return Array(try StateFile.encode(snapshot).dropFirst(StateFile.headerSize))
        }
        let transport = VirtioMMIOTransport(device: VirtioRNG(), memory: GuestImage.memory, interrupt: VirtioInterrupt(line: NullLine()))
        let devices = ["serial0": DeviceState(serial: .reset), "virtio-rng0": DeviceState(virtio: try transport.saveState())]
        let network = SnapshotNetwork(mac: try MACAddress(parsing: "02:53:57:00:00:01"), mtu: 65520,
                                      policy: NetworkConfiguration(allowedHosts: [try HostPattern(parsing: "example.com")],
                                                                   published: [PortPublication(hostPort: 8080, guestPort: 80)]))
        return [try state(cpus: 0, disks: [], devices: devices, diff: false),
                try state(cpus: 0, disks: [SnapshotDisk(path: "/images/layer.erofs", readOnly: true, size: 4096, file: nil),
                                           SnapshotDisk(path: "/machines/a/disk", readOnly: false, size: 1 << 20, file: "disk-1")], devices: devices, diff: true),
                try state(cpus: 1, disks: [], devices: [:], diff: false),
                try state(cpus: 1, disks: [], devices: devices, diff: false, network: network)]
    }
}

extension StateFile {
    /// The header `encode` puts before `payload` (the format's, with the payload's checksum).
    static func header(for payload: [UInt8]) -> [UInt8] {
        var header = magic + littleEndian(version) + littleEndian(UInt32(headerSize)) + littleEndian(UInt64(payload.count)) + SHA256.hash(payload)
        header += [UInt8](repeating: 0, count: headerSize - header.count)
        return header
    }
}

/// A snapshot memory file's header as a restore opens it. The input is the file (the header page
/// and what follows); files shorter than a page are padded to one.
enum MemoryFileFuzz {
    static func run(_ bytes: [UInt8]) {
        let path = Scratch.write(bytes + [UInt8](repeating: 0, count: max(0, 4096 - bytes.count)), to: "memory")
        guard let opened = try? MemoryFile.open(path) else { return }
        let file = opened.file
        precondition(file.fileBytes == UInt64(max(bytes.count, 4096)), "a memory file was accepted at a size its header does not give")
        let bitmap = try? file.presentPages(opened.descriptor)
        precondition(file.kind == .full || bitmap?.count == Int(file.bitmapBytes / 8), "a diff's bitmap was read short")
    }

    static func seeds() throws -> [[UInt8]] {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4096), (GuestAddress(1 << 20), 4096)])
        try memory.write([1, 2, 3], at: GuestAddress(1 << 20))
        let path = Scratch.directory + "/seed-memory"
        var seeds: [[UInt8]] = []
        for diff in [false, true] {
            unlink(path)
            if diff { memory.startTrackingWrites(); try memory.write([9], at: GuestAddress(0)) }
            _ = try MemoryFile.write(memory, to: path, id: SnapshotID(bytes: Array(repeating: 3, count: 16)),
                                     diffFrom: diff ? SnapshotID(bytes: Array(repeating: 2, count: 16)) : nil,
                                     dirty: diff ? memory.takeWrittenPages() : nil)
            seeds.append(try OwnedFileDescriptor.readSmallFile(path, limit: 1 << 20))
        }
        return seeds
    }
}

/// A working-set file beside a snapshot. The input is the file; the target gives it the snapshot
/// id and checksum it must carry (a crafted one would) and a page count from its header.
enum WorkingSetFuzz {
    static let snapshot = SnapshotID(bytes: Array(repeating: 5, count: 16))

    static func run(_ bytes: [UInt8]) {
        var file = bytes
        guard file.count >= WorkingSet.headerSize else { return }
        file.replaceSubrange(12..<28, with: snapshot.bytes)
        file.replaceSubrange(40..<72, with: SHA256.hash(Array(file[WorkingSet.headerSize...])))
        let pageCount = Int(truncatingIfNeeded: LittleEndian.read(file, at: 28, count: 8) & 0xFFFF_FFFF)
        guard let set = try? WorkingSet.decode(file, path: "working-set", snapshot: snapshot, pageCount: pageCount) else { return }
        for run in set.runs { precondition(run.lowerBound >= 0 && run.upperBound <= pageCount, "a working-set run outside guest memory was accepted") }
        let again = try? WorkingSet.decode(set.encode(), path: "working-set", snapshot: snapshot, pageCount: pageCount)
        precondition(again == set, "a working set does not survive encoding")
    }

    static func seeds() throws -> [[UInt8]] {
        [try WorkingSet(snapshot: snapshot, pageCount: 4096, runs: [0..<16, 100..<101, 4000..<4096]).encode(),
         try WorkingSet(snapshot: snapshot, pageCount: 16, runs: []).encode()]
    }
}
