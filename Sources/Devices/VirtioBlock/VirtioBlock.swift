import GuestMemory
import Synchronization
import SwiftletSystem
import Virtio

/// A virtio block device (virtio 1.2, section 5.2) over a `BlockBackend`: one request queue,
/// reads, writes, flush and the device id; read-only disks refuse writes with an I/O error.
///
/// Requests are served on the notifying vCPU's thread, synchronously: the guest's I/O waits for
/// the host's, which keeps completions in order and needs no extra thread.
///
/// A device can start as an empty drive (capacity zero, `EmptyBlockBackend`) and have a disk
/// inserted later: the guest is told its configuration changed and sees the new capacity. Only an
/// empty drive takes a disk: the guest never read anything from it, so it caches nothing stale.
public final class VirtioBlock: SingleQueueDevice {
    public static let sectorSize: UInt64 = 512
    public static let queueSize: UInt16 = 256
    /// The id (`GET_ID`) is at most 20 bytes.
    public static let identifierLength = 20

    public enum Feature {
        public static let segmentMaximum: UInt64 = 1 << 2
        public static let readOnly: UInt64 = 1 << 5
        public static let flush: UInt64 = 1 << 9
    }
    public enum RequestType {
        public static let read: UInt32 = 0
        public static let write: UInt32 = 1
        public static let flush: UInt32 = 4
        public static let getID: UInt32 = 8
    }
    public enum Status {
        public static let ok: UInt8 = 0
        public static let ioError: UInt8 = 1
        public static let unsupported: UInt8 = 2
    }
    static let headerSize: UInt64 = 16

    /// The disk in the drive and its size in sectors, replaced once when a disk goes into an
    /// empty drive.
    private struct Medium {
        var backend: any BlockBackend
        var capacitySectors: UInt64
        var generation: UInt32
    }
    private let medium: Mutex<Medium>
    public let isReadOnly: Bool
    public let identifier: String

    public var backend: any BlockBackend { medium.withLock { $0.backend } }
    public var capacitySectors: UInt64 { medium.withLock { $0.capacitySectors } }
    /// Whether the drive has no disk (`EmptyBlockBackend`).
    public var isEmpty: Bool { medium.withLock { $0.backend is EmptyBlockBackend } }

    public let requestQueue: DeviceQueue
    private let onError: @Sendable (SwiftletError) -> Void
    /// The chunks the guest wrote since tracking started or was last taken (one bit per
    /// `writeChunkSize` bytes), while a migration copies the disk; nil when not tracking.
    private let writeLog = Mutex<[UInt64]?>(nil)
    public static let writeChunkSize: UInt64 = 64 << 10

    public init(backend: any BlockBackend, readOnly: Bool, identifier: String,
                onError: @escaping @Sendable (SwiftletError) -> Void = { _ in }) {
        self.medium = Mutex(Medium(backend: backend, capacitySectors: backend.byteCount / Self.sectorSize, generation: 0))
        self.isReadOnly = readOnly
        self.identifier = String(identifier.utf8.prefix(Self.identifierLength))!
        self.onError = onError
        self.requestQueue = DeviceQueue(name: "virtio-blk \(self.identifier)", onError: onError)
    }

    public var deviceType: VirtioDeviceType { .block }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize] }
    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors
            | Feature.segmentMaximum | Feature.flush | (isReadOnly ? Feature.readOnly : 0)
    }

    public var configurationGeneration: UInt32 { medium.withLock { $0.generation } }

    /// Puts `disk` into the drive, which must be empty; the caller then signals the configuration
    /// change to the driver (the transport's `configurationChanged()`).
    public func insert(_ disk: any BlockBackend) throws(SwiftletError) {
        let result: Result<Void, SwiftletError> = medium.withLock { m in
            guard m.backend is EmptyBlockBackend else {
                return .failure(SwiftletError(.invalidArgument, "virtio-blk \(identifier) already holds a disk: only an empty drive takes one"))
            }
            m = Medium(backend: disk, capacitySectors: disk.byteCount / Self.sectorSize, generation: m.generation &+ 1)
            return .success(())
        }
        try result.get()
    }

    /// Starts recording which `writeChunkSize` chunks the guest writes (a migration copying the
    /// disk while the machine runs sends them again).
    public func startTrackingWrites() {
        let chunks = (backend.byteCount + Self.writeChunkSize - 1) / Self.writeChunkSize
        writeLog.withLock { log in if log == nil { log = [UInt64](repeating: 0, count: Int((chunks + 63) / 64)) } }
    }

    /// The chunks written since tracking started or since the last call, and clears the record
    /// (empty when not tracking).
    public func takeWrittenChunks() -> [UInt64] {
        writeLog.withLock { log in
            guard let taken = log else { return [] }
            log = [UInt64](repeating: 0, count: taken.count)
            return taken
        }
    }

    /// Stops recording writes.
    public func stopTrackingWrites() {
        writeLog.withLock { $0 = nil }
    }

    /// Records a completed write of `length` bytes at `offset`.
    private func recordWrite(at offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        writeLog.withLock { log in
            guard log != nil else { return }
            let first = offset / Self.writeChunkSize, last = (offset + length - 1) / Self.writeChunkSize
            for chunk in first...last where Int(chunk / 64) < log!.count { log![Int(chunk / 64)] |= 1 << (chunk % 64) }
        }
    }

    /// The configuration space: capacity (sectors) at 0, size_max at 8 (not offered), seg_max at 12.
    var configuration: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 16)
        LittleEndian.write(capacitySectors, 8, into: &bytes, at: 0)
        LittleEndian.write(UInt64(Self.queueSize - 2), 4, into: &bytes, at: 12)
        return bytes
    }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let config = configuration
        for i in data.indices { data[i] = offset + i < config.count ? config[offset + i] : 0 }
    }

    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}

    /// Serves one request; returns the number of bytes written into the chain's writable buffers.
    public func serve(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        guard chain.writableLength >= 1 else { return 0 } // nowhere to put a status: drop it
        let dataIn = DescriptorChain.segments(chain.writable, skipping: 0, keeping: chain.writableLength - 1)
        let status = DescriptorChain.segments(chain.writable, skipping: chain.writableLength - 1, keeping: 1)[0].address
        var written: UInt64 = 0
        let result: UInt8
        let (backend, capacitySectors) = medium.withLock { ($0.backend, $0.capacitySectors) }
        if let header = try? Self.header(chain, memory: memory) {
            let dataOut = DescriptorChain.segments(chain.readable, skipping: Self.headerSize, keeping: chain.readableLength - Self.headerSize)
            switch header.type {
            case RequestType.read:
                result = transfer(dataIn, sector: header.sector, memory: memory, isWrite: false, backend: backend, capacitySectors: capacitySectors)
                if result == Status.ok { written = chain.writableLength - 1 }
            case RequestType.write:
                result = isReadOnly ? Status.ioError
                    : transfer(dataOut, sector: header.sector, memory: memory, isWrite: true, backend: backend, capacitySectors: capacitySectors)
            case RequestType.flush:
                result = (try? backend.flush()) != nil ? Status.ok : Status.ioError
            case RequestType.getID:
                var id = Array(identifier.utf8)
                id += [UInt8](repeating: 0, count: Self.identifierLength - id.count)
                var offset = 0
                for segment in dataIn where offset < id.count {
                    let n = min(Int(segment.length), id.count - offset)
                    try? memory.write(id[offset..<offset + n], at: segment.address)
                    offset += n
                }
                written = UInt64(offset)
                result = Status.ok
            default:
                result = Status.unsupported
            }
        } else {
            result = Status.ioError
        }
        try? memory.write(result, at: status)
        return UInt32(truncatingIfNeeded: written + 1)
    }

    /// Moves the bytes of `segments` to or from the disk from `sector` on.
    func transfer(_ segments: [DescriptorChain.Segment], sector: UInt64, memory: GuestMemory, isWrite: Bool,
                  backend: any BlockBackend, capacitySectors: UInt64) -> UInt8 {
        let total = segments.reduce(0) { $0 + $1.length }
        guard total % Self.sectorSize == 0, sector <= capacitySectors, total / Self.sectorSize <= capacitySectors - sector else {
            return Status.ioError
        }
        var offset = sector * Self.sectorSize
        do throws(SwiftletError) {
            for segment in segments {
                let p = isWrite ? try memory.hostPointer(segment.address, length: segment.length)
                    : try memory.hostPointer(forWriting: segment.address, length: segment.length)
                // SAFETY: hostPointer checked that the segment lies in guest memory.
                if isWrite {
                    try backend.write(from: UnsafeRawBufferPointer(start: p, count: Int(segment.length)), at: offset)
                    // After the write: a copy that takes the record before it sees the new bytes or sends the chunk again.
                    recordWrite(at: offset, length: segment.length)
                } else {
                    try backend.read(into: UnsafeMutableRawBufferPointer(start: p, count: Int(segment.length)), at: offset)
                }
                offset += segment.length
            }
            return Status.ok
        } catch {
            onError(SwiftletError(error.code, "virtio-blk \(identifier): \(error.message)", cause: error.cause))
            return Status.ioError
        }
    }

    /// The request header (type, reserved, sector), gathered from the first readable bytes.
    static func header(_ chain: DescriptorChain, memory: GuestMemory) throws(SwiftletError) -> (type: UInt32, sector: UInt64) {
        guard chain.readableLength >= headerSize else {
            throw SwiftletError(.invalidFormat, "virtio-blk request without a header")
        }
        let bytes = try chain.readPrefix(Int(headerSize), memory: memory)
        return (UInt32(LittleEndian.read(bytes, at: 0, count: 4)), LittleEndian.read(bytes, at: 8, count: 8))
    }
}
