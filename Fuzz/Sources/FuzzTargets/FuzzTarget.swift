import Glibc
import SwiftletSystem

/// The fuzz targets: each takes arbitrary bytes and feeds them to one piece of code that reads
/// outside input (guest memory, device registers, agent and control messages, images, snapshots),
/// checking that it never crashes and that what it keeps stays bounded. libFuzzer drives them
/// through `swiftlet-fuzz` (`make fuzz`); Tests/FuzzTests replays the seed corpus through the same
/// entry points (and is where a crashing input becomes a regression test).
public enum FuzzTarget: String, CaseIterable, Sendable {
    case virtqueue, virtioBlock = "virtio-blk", virtioVsock = "virtio-vsock", virtioRNG = "virtio-rng"
    case mmio, serial8250 = "serial-8250", agentFrames = "agent-frames", controlJSON = "control-json"
    case tarEROFS = "tar-erofs", snapshotState = "snapshot-state", memoryFile = "memory-file"
    case workingSet = "working-set", ociDocuments = "oci-documents"
    case egressFilter = "egress-filter"
    case virtioNet = "virtio-net"
    case pack
    case migrationStream = "migration-stream"
    case virtioBalloon = "virtio-balloon"
    case virtioFS = "virtio-fs"

    /// Runs one input. Errors the code reports are expected outcomes; a violated invariant traps.
    public func run(_ input: [UInt8]) {
        switch self {
        case .virtqueue: VirtqueueFuzz.run(input)
        case .virtioBlock: BlockFuzz.run(input)
        case .virtioVsock: VsockFuzz.run(input)
        case .virtioRNG: RNGFuzz.run(input)
        case .mmio: MMIOFuzz.run(input)
        case .serial8250: SerialFuzz.run(input)
        case .agentFrames: AgentFrameFuzz.run(input)
        case .controlJSON: ControlJSONFuzz.run(input)
        case .tarEROFS: TarEROFSFuzz.run(input)
        case .snapshotState: SnapshotStateFuzz.run(input)
        case .memoryFile: MemoryFileFuzz.run(input)
        case .workingSet: WorkingSetFuzz.run(input)
        case .ociDocuments: OCIDocumentsFuzz.run(input)
        case .egressFilter: EgressFilterFuzz.run(input)
        case .virtioNet: VirtioNetFuzz.run(input)
        case .pack: PackFuzz.run(input)
        case .migrationStream: MigrationStreamFuzz.run(input)
        case .virtioBalloon: BalloonFuzz.run(input)
        case .virtioFS: FuseFuzz.run(input)
        }
    }

    /// Seed inputs made by the code itself from real data (encoded messages, a real state file,
    /// a real tar...): `swiftlet-fuzz seeds DIR` writes them as the committed corpus.
    public func seeds() throws -> [[UInt8]] {
        switch self {
        case .virtqueue: try VirtqueueFuzz.seeds()
        case .virtioBlock: try BlockFuzz.seeds()
        case .virtioVsock: try VsockFuzz.seeds()
        case .virtioRNG: try RNGFuzz.seeds()
        case .mmio: MMIOFuzz.seeds()
        case .serial8250: SerialFuzz.seeds()
        case .agentFrames: AgentFrameFuzz.seeds()
        case .controlJSON: try ControlJSONFuzz.seeds()
        case .tarEROFS: TarEROFSFuzz.seeds()
        case .snapshotState: try SnapshotStateFuzz.seeds()
        case .memoryFile: try MemoryFileFuzz.seeds()
        case .workingSet: try WorkingSetFuzz.seeds()
        case .ociDocuments: OCIDocumentsFuzz.seeds()
        case .egressFilter: EgressFilterFuzz.seeds()
        case .virtioNet: try VirtioNetFuzz.seeds()
        case .pack: try PackFuzz.seeds()
        case .migrationStream: MigrationStreamFuzz.seeds()
        case .virtioBalloon: try BalloonFuzz.seeds()
        case .virtioFS: try FuseFuzz.seeds()
        }
    }

    /// The largest input worth generating (libFuzzer's -max_len).
    public var maximumInputLength: Int {
        switch self {
        case .tarEROFS: 64 << 10
        case .memoryFile: 20 << 10
        case .migrationStream: 16 << 10
        case .virtqueue, .virtioBlock, .virtioVsock, .virtioRNG, .virtioBalloon, .virtioFS, .mmio, .virtioNet, .pack: 8 << 10
        default: 4 << 10
        }
    }
}

/// Reads an input front to back; past its end every read is zero.
struct FuzzInput {
    let bytes: [UInt8]
    private(set) var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { position >= bytes.count }

    mutating func byte() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    mutating func integer<T: FixedWidthInteger>(_ type: T.Type = T.self) -> T {
        var value: T = 0
        for i in 0..<(T.bitWidth / 8) { value |= T(truncatingIfNeeded: byte()) << (8 * i) }
        return value
    }

    mutating func take(_ count: Int) -> [UInt8] {
        let end = min(bytes.count, position + max(0, count))
        defer { position = end }
        return Array(bytes[min(position, end)..<end])
    }

    /// What is left.
    mutating func rest() -> [UInt8] { take(bytes.count - position) }
}

/// Little-endian encoding for seed builders.
func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<(T.bitWidth / 8)).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}

extension FuzzTarget {
    /// Writes every target's seeds to `directory`/<target>/seed-N.
    public static func writeSeeds(to directory: String) throws {
        for target in allCases {
            let path = directory + "/" + target.rawValue
            mkdir(path, 0o755)
            for (i, seed) in try target.seeds().enumerated() {
                try OwnedFileDescriptor.writeSmallFileAtomically(path + "/seed-\(i)", seed)
            }
        }
    }
}
