import GuestMemory
import Synchronization
import SwiftletSystem
import Virtio

/// A virtio file system device (virtio 1.2, section 5.11): FUSE requests over virtqueues,
/// answered by a `FuseServer` inside the VMM process, so a guest mounts host directories
/// (`mount -t virtiofs TAG DIR`) with no daemon beside the VMM.
///
/// Threads: requests are served on the device's own thread, started with the device (before the
/// VMM process confines itself), which adds the file server's seccomp filter before its first
/// request: the vCPU threads that notify it cannot open files, and must not wait for the host's
/// disk. While the machine is paused the thread leaves the queues alone.
///
/// Snapshots: the queues are saved as any device's, and the server's tables as names beneath
/// the volumes (`FuseServer.saveState`); the host directories themselves are not in a snapshot,
/// and a restore is given them again.
public final class VirtioFS: VirtioDevice {
    /// The high-priority queue (FORGET) and one request queue.
    public static let queueSizes: [UInt16] = [128, 256]
    static let hiprioQueue = 0, requestQueue = 1
    /// The tag the guest mounts (config space: 36 bytes, NUL-padded).
    public static let defaultTag = "swiftlet"
    /// The most bytes of a request the device reads (a WRITE's data, its header, a name or two).
    static let maximumRequest = FuseServer.maximumTransfer + 8192

    public let server: FuseServer
    private let tag: [UInt8]
    private let queues: [DeviceQueue]
    private let wake: EventFD
    private let halted = Atomic<Bool>(false)
    /// Held while the thread serves a batch; `quiesced` set under it stops the next one.
    private let serving = Mutex<Bool>(false)
    private let onError: @Sendable (SwiftletError) -> Void

    /// Serves `volumes` (each opened now: an error names one that cannot be) to the guest under `tag`.
    public init(volumes: [SharedVolume], tag: String = defaultTag, limits: FuseServer.Limits = .init(),
                onError: @escaping @Sendable (SwiftletError) -> Void = { _ in }) throws(SwiftletError) {
        guard !tag.isEmpty, tag.utf8.count <= 36 else { throw SwiftletError(.invalidArgument, "virtio-fs tag \"\(tag)\" is not 1 to 36 bytes") }
        server = try FuseServer(volumes: volumes, limits: limits)
        self.tag = Array(tag.utf8)
        self.onError = onError
        queues = ["hiprio", "request"].map { DeviceQueue(name: "virtio-fs \($0) queue", onError: onError) }
        wake = try EventFD()
        try OSThread.start(name: "virtio-fs") { [self] in runLoop() }.detach()
    }

    public var deviceType: VirtioDeviceType { .fileSystem }
    public var offeredFeatures: UInt64 { VirtioFeature.version1 | VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors }
    public var queueMaximumSizes: [UInt16] { Self.queueSizes }

    /// struct virtio_fs_config: tag[36], num_request_queues (1).
    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let bytes = tag + [UInt8](repeating: 0, count: 36 - tag.count) + LittleEndian.bytes(1, 4)
        for i in 0..<data.count { data[i] = offset >= 0 && offset + i < bytes.count ? bytes[offset + i] : 0 }
    }

    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        for index in queues.indices { try queues[index].activate(activation, index: index) }
        wake.signal()
    }

    /// The driver reset the device: its queues and every file the guest held are forgotten.
    public func reset() {
        serving.withLock { _ in
            for queue in queues { queue.reset() }
        }
        server.reset()
    }

    public func queueNotified(_ index: Int) {
        guard !halted.load(ordering: .acquiring) else { return }
        wake.signal()
    }

    public func setQuiesced(_ quiesced: Bool) {
        serving.withLock { $0 = quiesced } // waits for a batch in progress
        if !quiesced { wake.signal() }
    }

    public func requestStop() {
        halted.store(true, ordering: .releasing)
        for queue in queues { queue.halt() }
        wake.signal()
    }

    public var servedQueues: [Virtqueue?]? { queues.map(\.current) }

    // MARK: the device's thread

    private func runLoop() {
        var confinement = DeviceThreadConfinement(.fileServer)
        while !halted.load(ordering: .acquiring) {
            _ = try? Poll.waitReadable(wake.rawValue)
            wake.drain()
            guard !halted.load(ordering: .acquiring) else { break }
            do throws(SwiftletError) { try confinement.apply() } catch {
                onError(SwiftletError(error.code, "virtio-fs: \(error.message)"))
                requestStop()
                break
            }
            serving.withLock { quiesced in
                guard !quiesced else { return }
                queues[Self.hiprioQueue].serve { chain, memory in serve(chain, memory) }
                queues[Self.requestQueue].serve { chain, memory in serve(chain, memory) }
            }
        }
        server.reset() // the descriptors go with the machine's end
    }

    /// One request: its readable buffers are the request, its writable ones take the reply.
    func serve(_ chain: DescriptorChain, _ memory: GuestMemory) -> UInt32 {
        do throws(SwiftletError) {
            if let served = try serveTransfer(chain, memory) { return served }
            let request = try chain.readPrefix(Int(min(chain.readableLength, UInt64(Self.maximumRequest))), memory: memory)
            let limit = Int(min(chain.writableLength, UInt64(Self.maximumRequest)))
            guard let reply = server.handle(request, replyLimit: limit) else { return 0 }
            return UInt32(try chain.writePrefix(reply, memory: memory))
        } catch {
            onError(SwiftletError(error.code, "virtio-fs: \(error.message)"))
            return 0
        }
    }

    /// READ and WRITE without copies: the file's bytes go between the host file and the guest's
    /// buffers (preadv/pwritev on guest memory). Returns nil for any other request, or one whose
    /// shape is not the usual (the general path answers those).
    private func serveTransfer(_ chain: DescriptorChain, _ memory: GuestMemory) throws(SwiftletError) -> UInt32? {
        let fixed = Fuse.inHeaderSize + 40 // fuse_read_in and fuse_write_in are both 40 bytes
        guard chain.readableLength >= UInt64(fixed), chain.writableLength >= UInt64(Fuse.outHeaderSize) else { return nil }
        let prefix = try chain.readPrefix(fixed, memory: memory)
        guard let header = FuseReader.header(prefix),
              header.opcode == Fuse.Opcode.read.rawValue || header.opcode == Fuse.Opcode.write.rawValue else { return nil }
        var r = FuseReader(prefix, at: Fuse.inHeaderSize)
        guard let fh = r.u64(), let offset = r.u64(), let size = r.u32().map(Int.init) else { return nil }
        let result: Result<Int, FileErrno>
        if header.opcode == Fuse.Opcode.read.rawValue {
            guard header.length == UInt32(fixed) else { return nil }
            let count = min(size, FuseServer.maximumTransfer, Int(chain.writableLength) - Fuse.outHeaderSize)
            var buffers: [UnsafeMutableRawBufferPointer] = []
            for segment in DescriptorChain.segments(chain.writable, skipping: UInt64(Fuse.outHeaderSize), keeping: UInt64(count)) {
                // SAFETY: the chain's buffers were checked to lie in guest memory; hostPointer checks again.
                let pointer = try memory.hostPointer(forWriting: segment.address, length: segment.length)
                buffers.append(UnsafeMutableRawBufferPointer(start: pointer, count: Int(segment.length)))
            }
            result = server.read(fh, offset: offset, into: buffers).map { Fuse.outHeaderSize + $0 }
        } else {
            // The reply's room is checked first: a write done here is never done again by the general path.
            guard Int(header.length) == fixed + size, chain.readableLength >= UInt64(header.length), size <= FuseServer.maximumTransfer,
                  chain.writableLength >= UInt64(Fuse.outHeaderSize + 8) else { return nil }
            var buffers: [UnsafeRawBufferPointer] = []
            for segment in DescriptorChain.segments(chain.readable, skipping: UInt64(fixed), keeping: UInt64(size)) {
                // SAFETY: as above.
                let pointer = try memory.hostPointer(segment.address, length: segment.length)
                buffers.append(UnsafeRawBufferPointer(start: pointer, count: Int(segment.length)))
            }
            switch server.write(fh, offset: offset, from: buffers) {
            case .success(let written):
                let reply = FuseServer.replyHeader(unique: header.unique, result: .success(Fuse.outHeaderSize + 8)) + FuseServer.writeBytes(written)
                return UInt32(try chain.writePrefix(reply, memory: memory))
            case .failure(let e):
                result = .failure(e)
            }
        }
        let replyHeader = FuseServer.replyHeader(unique: header.unique, result: result)
        try chain.writePrefix(replyHeader, memory: memory)
        if case .success(let length) = result { return UInt32(length) }
        return UInt32(Fuse.outHeaderSize)
    }
}
