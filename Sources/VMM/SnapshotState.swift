import Hypervisor
import MachineState
import SwiftletNet
import SwiftletSystem

/// The hardware a snapshot was taken of; a restore builds the same.
public struct SnapshotHardware: Codable, Sendable, Equatable {
    public var cpuCount: Int
    public var memoryMiB: Int
    /// The disks: read-only ones by path (their contents are not part of the snapshot), writable
    /// ones with a copy of their contents in the snapshot.
    public var disks: [SnapshotDisk]
    public var entropyDevice: Bool
    /// The vsock device's guest CID, if the machine has one. Its connections are not kept: the
    /// guest is told they were reset.
    public var vsockGuestCID: UInt64?
    /// The network device, if the machine has one. Its backend (passt) and open flows are not
    /// kept: a restore joins the device to a new backend, and the guest's connections are reset.
    public var network: SnapshotNetwork? = nil
    /// Whether the machine has a balloon device (absent in snapshots from before it had one).
    public var balloon: Bool? = nil
    /// The directories the machine shared with its guest (virtio-fs), in order: whether each
    /// was read-only, never where it was (a restore is given the directories; absent: none).
    public var volumes: [SnapshotVolume]? = nil

    init(_ shape: MachineShape, diskSizes: [UInt64]) {
        cpuCount = shape.cpuCount
        memoryMiB = shape.memoryMiB
        disks = zip(shape.disks, diskSizes).map { SnapshotDisk(path: $0.path, readOnly: $0.readOnly, size: $1, file: nil) }
        entropyDevice = shape.entropyDevice
        vsockGuestCID = shape.vsock?.guestCID
        balloon = shape.balloon ? true : nil
        network = shape.network.map { SnapshotNetwork(mac: $0.guest.guestMAC, mtu: $0.guest.mtu, policy: $0.policy) }
        volumes = shape.volumes.isEmpty ? nil : shape.volumes.map { SnapshotVolume(readOnly: $0.readOnly) }
    }
}

/// A directory a snapshotted machine shared with its guest: only whether it was read-only.
public struct SnapshotVolume: Codable, Sendable, Equatable {
    public var readOnly: Bool
}

/// The network device of a snapshotted machine: what its guest driver knows (MAC, MTU), and the
/// policy it ran under (a restore may run it under another).
public struct SnapshotNetwork: Codable, Sendable, Equatable {
    public var mac: MACAddress
    public var mtu: Int
    public var policy: NetworkConfiguration
}

/// A disk of a snapshotted machine.
public struct SnapshotDisk: Codable, Sendable, Equatable {
    /// Where the machine's disk was (for a copy-on-write disk, its overlay).
    public var path: String
    public var readOnly: Bool
    public var size: UInt64
    /// For a writable disk: the file in the snapshot's directory that holds its contents as they
    /// were when the snapshot was taken (a sparse file; `SnapshotDirectory.diskFileName`).
    public var file: String?
}

/// Everything the state file of a snapshot holds (docs/snapshot-format.md).
struct MachineSnapshot: Codable, Sendable {
    var id: SnapshotID
    var kind: MemoryFile.Kind
    /// For a diff: the snapshot it is a diff of, and that snapshot's directory (absolute).
    var parent: SnapshotID?
    var parentDirectory: String?
    /// Host CLOCK_REALTIME when taken (ns).
    var createdAt: UInt64
    var hardware: SnapshotHardware
    /// Whether the guest is a Linux kernel (which a PVM-backed /dev/kvm cannot run).
    var guestIsLinux: Bool
    /// The CPUID each vCPU saw: a restore shows the guest the same CPU.
    var cpuid: [[CPUIDEntry]]
    var vcpus: [VCPUState]
    var vm: VMState
    /// Every device's state, by device id (`DeviceID`: `serial0`, `virtio-blk0`, ...).
    var devices: [String: DeviceState]
    /// What the snapshot's maker recorded with it (the CLI: the image's command defaults).
    var annotations: [String: String]
    /// The key the machine's guest agent holds (`AgentKey`); absent when it held none.
    var agentKey: AgentKey? = nil
    /// The frequency of the guest's TSC (vCPU 0's), which it calibrated its timers against;
    /// absent in snapshots from before it was recorded.
    var tscKHz: UInt64? = nil

    /// The CPU this snapshot's memory depends on: vCPU 0's features, the vendor, the TSC frequency.
    var cpuContract: CPUContract { CPUContract(guest: cpuid.first ?? [], tscKHz: tscKHz) }
}

/// A full snapshot holds all of guest memory; a diff only the pages written since the machine's
/// previous snapshot (or its restore), and needs that snapshot to restore.
public enum SnapshotKind: Sendable {
    case full
    case diff
}

/// What taking a snapshot did.
public struct SnapshotReport: Sendable {
    public var id: String
    public var directory: String
    public var kind: SnapshotKind
    /// Guest memory pages written, and bytes written in all (state file included).
    public var memoryPagesWritten: Int
    public var bytesWritten: UInt64
    /// How long the guest was paused for the snapshot (ns), pausing and resuming included.
    public var pausedNanoseconds: UInt64
}

/// Where a restore finds the read-only disks a snapshot was taken with. A snapshot names them by
/// the paths they had, and a snapshot made elsewhere (or altered) can name any host file there:
/// a restore opens only what its resolver returns for a recorded path, and the resolver throws
/// (with a clear message) for a path it does not vouch for. Writable disks never go through it:
/// their contents are files in the snapshot's own directory.
public struct SnapshotDiskResolver: Sendable {
    /// The file to open for a recorded path; throws to refuse it.
    public let resolve: @Sendable (String) throws(SwiftletError) -> String

    /// `resolve` maps a recorded path to the file to open, or throws to refuse it.
    public init(_ resolve: @escaping @Sendable (String) throws(SwiftletError) -> String) {
        self.resolve = resolve
    }

    /// Refuses every read-only disk the snapshot names (the default: a caller that restores
    /// snapshots with read-only disks says which files those may be).
    public static let none = SnapshotDiskResolver { path throws(SwiftletError) in
        throw SwiftletError(.invalidArgument, "the snapshot names the read-only disk \(path), and this restore was given no disks that a snapshot may name")
    }

    /// Only the paths in `paths`, as they are (say, the disks the caller gave the machine it
    /// snapshotted itself).
    public static func only(_ paths: some Sequence<String>) -> SnapshotDiskResolver {
        let allowed = Set(paths)
        return SnapshotDiskResolver { path throws(SwiftletError) in
            guard allowed.contains(path) else {
                throw SwiftletError(.invalidArgument, "the snapshot names the read-only disk \(path), which is not one of the disks this restore may open")
            }
            return path
        }
    }
}
