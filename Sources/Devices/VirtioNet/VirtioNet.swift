import GuestMemory
import Synchronization
import SwiftletNet
import SwiftletSystem
import Virtio

/// A virtio network device (virtio 1.2, section 5.1) whose other end is a stream socket speaking
/// passt's "qemu" framing: each Ethernet frame is a 4-byte big-endian length, then the frame
/// (what QEMU's `-netdev stream` speaks). An optional `FrameFilter` sees every frame in both
/// directions and may drop it, or answer a guest's frame on the host (its replies go to the
/// guest's receive queue; a `.reply` verdict on an inbound frame drops the frame). The filter is
/// called with the direction's lock held: it must not call into the device (but `requestStop`).
///
/// Features: VERSION_1, MAC, STATUS (the link is always up), MTU, MRG_RXBUF, CSUM (the device
/// completes a partial checksum before the frame leaves), GUEST_CSUM (frames to the guest are
/// marked DATA_VALID), event index and indirect descriptors. One receive queue (0) and one
/// transmit queue (1), no control queue. A driver may take fewer features: without MRG_RXBUF
/// each frame takes one receive chain; the header is 12 bytes either way (VERSION_1).
///
/// Threads: the guest's transmitted frames are served on the vCPU thread that notified the
/// transmit queue (no handoff to another thread per kick, and Linux already batches frames per
/// kick; the frames go to the socket while they are hot). The device's own thread (epoll on the
/// socket and an eventfd, as `VirtioVsock`) reads the socket into the receive queue, and takes
/// up transmission again when the socket, full before, drains. Each direction has its own lock,
/// so a guest sending and receiving at once is served by two threads.
///
/// Bounds, so neither side can make the device hold more: at most `transmitBufferSize` bytes of
/// guest frames wait for the socket (past that the device leaves the guest's frames in its
/// transmit queue until the socket drains); at most `receiveBufferSize` bytes are read ahead of
/// the guest, and while the guest has posted no receive buffers for the next frame the socket is
/// not read at all (its buffer holds passt back); at most `maximumPendingReplies` frames the
/// filter made wait for receive buffers. A frame the guest sends larger than its MTU allows, a
/// chain too short for the header, a writable transmit buffer, a partial checksum whose offsets
/// lie outside the frame: dropped and counted (`statistics`), never trusted. A frame length on
/// the socket of 0 or past `maximumStreamFrame` is a broken peer: the device closes the socket.
/// When the socket closes or fails, the link stays up and the guest's frames are dropped; the
/// device reports it through `onError` once. Each kind of malformed guest input is reported
/// once too (and counted every time).
///
/// Snapshots hold the queues' positions only: frames on their way are dropped, as a network may
/// drop them (a restored machine gets a new passt, and its guest's flows are reset by their
/// peers), so `didRestore` has nothing to do.
///
/// To attach one: `VirtioNet(mac:backend:filter:onError:)` with the VMM's end of passt's socket
/// pair, behind a `VirtioMMIOTransport` like the other virtio devices; when the machine ends,
/// `requestStop()` (with the others), then `stop()`, which joins the device's thread and shuts
/// the socket down so passt sees end of file.
public final class VirtioNet: VirtioDevice {
    public static let queueSize: UInt16 = 256
    /// passt's own MTU: the guest's TCP then sends 64 KiB segments without any segmentation offload.
    public static let defaultMTU: UInt16 = 65520
    /// The smallest MTU IPv4 allows (and Linux accepts).
    public static let minimumMTU: UInt16 = 68
    /// The largest frame the socket's framing may carry: an IP packet's largest size plus an
    /// Ethernet header with a VLAN tag. A larger length means the peer is broken.
    public static let maximumStreamFrame = 65_535 + 18
    /// Bytes of the guest's frames (with their length prefixes) waiting for the socket, at most.
    public static let transmitBufferSize = 256 << 10
    /// Bytes read from the socket ahead of the guest, at most.
    public static let receiveBufferSize = 256 << 10
    /// Frames the filter made for the guest (replies) waiting for receive buffers, at most.
    public static let maximumPendingReplies = 64
    static let ethernetHeaderSize = 14
    static let receiveQueue = 0, transmitQueue = 1

    public let mac: MACAddress
    public let mtu: UInt16
    /// The largest frame either side may pass: the MTU plus the Ethernet header (virtio 1.2, 5.1.6.2).
    let maximumFrame: Int

    /// What the device counted since it was made.
    public struct Statistics: Sendable, Equatable {
        /// Frames the guest sent that went to the socket.
        public var transmittedFrames = 0
        /// Frames written into the guest's receive buffers (filter replies included).
        public var receivedFrames = 0
        /// Frames larger than the MTU allows (from the guest, or from the socket).
        public var droppedOversized = 0
        /// Guest frames that could not be taken as they were: a chain with writable buffers or too
        /// short for the header and an Ethernet header, segmentation offload asked for, a partial
        /// checksum outside the frame; and frames from the socket shorter than an Ethernet header.
        public var droppedMalformed = 0
        /// Frames the filter dropped or answered, both directions.
        public var droppedByFilter = 0
        /// Guest frames dropped because the socket was closed.
        public var droppedBackendClosed = 0
        /// Frames for the guest that did not fit its receive buffers, and filter replies past
        /// `maximumPendingReplies`.
        public var droppedNoRoom = 0
        /// Receive chains the device could not use (a device-readable buffer, or room for less
        /// than the 12-byte header): returned to the driver empty.
        public var malformedReceiveChains = 0
        /// Partial checksums the device completed.
        public var checksumsCompleted = 0
    }

    private let backend: OwnedFileDescriptor
    private let filter: (any FrameFilter)?
    private let onError: @Sendable (SwiftletError) -> Void
    private let epoll: Epoll
    private let wake: EventFD
    private let receive: Mutex<Receive>
    private let transmit: Mutex<Transmit>
    private let watch = Mutex(Watch())
    private let loop = Mutex<OSThread?>(nil)
    private let stopping = Atomic<Bool>(false)
    /// Set by `requestStop` (and `stop`): nothing is served any more.
    private let halted = Atomic<Bool>(false)
    /// The socket was closed (end of file, an error, a broken frame length, `stop`).
    private let backendClosed = Atomic<Bool>(false)
    /// The receive side waits for the guest's buffers: a notification of the receive queue wakes
    /// the device's thread.
    private let receiveWaiting = Atomic<Bool>(false)
    /// The kinds of error already reported (bits of `Report`).
    private let reported = Atomic<UInt32>(0)
    private let startsThread: Bool

    /// Bytes owned by one side of the device, used only under that side's lock.
    final class ByteBuffer: @unchecked Sendable {
        // SAFETY (Sendable): the device touches `bytes` only while holding the lock of the state
        // that holds this buffer.
        let bytes: UnsafeMutableRawBufferPointer
        init(count: Int) { bytes = .allocate(byteCount: count, alignment: 16) }
        deinit { bytes.deallocate() }
    }

    /// The receive side: the guest's receive queue and the bytes read from the socket.
    struct Receive {
        var queue: Virtqueue?
        var memory: GuestMemory?
        var interrupt: VirtioInterrupt?
        var mergeable = false
        var dataValid = false
        var quiesced = false
        /// Bytes read from the socket; [start, end) are not yet taken.
        let stream = ByteBuffer(count: VirtioNet.receiveBufferSize)
        /// Where each frame's header is made.
        let header = ByteBuffer(count: VirtioNetHeader.size)
        var start = 0, end = 0
        /// The filter's verdict on the frame at `start` while it waits for receive buffers (the
        /// filter sees each frame once).
        var passes: Bool?
        /// Receive chains taken for the next frame (several with MRG_RXBUF), and their room.
        var held: [DescriptorChain] = []
        var heldBytes: UInt64 = 0
        /// Chains were returned to the driver in this pass (the guest may want an interrupt).
        var returned = false
        /// Frames the filter made for the guest, oldest first.
        var replies: [[UInt8]] = []
        var statistics = Statistics()
    }

    /// The transmit side: the guest's transmit queue and the frames waiting for the socket.
    struct Transmit {
        var queue: Virtqueue?
        var memory: GuestMemory?
        var interrupt: VirtioInterrupt?
        var quiesced = false
        /// Length-prefixed frames for the socket; [sent, end) are not yet sent.
        let staging = ByteBuffer(count: VirtioNet.transmitBufferSize)
        var sent = 0, end = 0
        /// Chains were left in the ring because `staging` was full: taken once the socket drains.
        var stalled = false
        var statistics = Statistics()
    }

    /// What the device's thread waits for on the socket.
    struct Watch {
        var registered = false
        var events: UInt32 = 0
        /// The receive side wants the socket's input (it has room and buffers for it).
        var read = false
        /// The transmit side has bytes the socket did not take.
        var write = false
        /// Quiesced: the device's thread leaves the socket alone.
        var paused = false
        /// The socket hung up or was closed: never watched again (it would be ready forever).
        var done = false
    }

    /// Kinds of error reported once each.
    enum Report: UInt32 {
        case oversized = 1, malformedTransmit = 2, malformedReceiveChain = 4, receiveBuffersTooSmall = 8
        case epoll = 16
    }

    /// `backend`: a connected stream socket in passt's framing; the device owns it. `mtu`: what
    /// the guest is told (at least 68). `onError`: what went wrong where the driver cannot see it.
    public convenience init(mac: MACAddress, mtu: UInt16 = 65520, backend: consuming OwnedFileDescriptor,
                            filter: (any FrameFilter)?, onError: @escaping @Sendable (SwiftletError) -> Void = { _ in }) throws(SwiftletError) {
        try self.init(mac: mac, mtu: mtu, backend: backend, filter: filter, startsThread: true, onError: onError)
    }

    /// `startsThread` false: no thread of its own; whoever drives the device calls `service()`
    /// (the fuzz target, for runs that do not depend on a thread's timing).
    package init(mac: MACAddress, mtu: UInt16, backend: consuming OwnedFileDescriptor, filter: (any FrameFilter)?,
                 startsThread: Bool, onError: @escaping @Sendable (SwiftletError) -> Void) throws(SwiftletError) {
        guard mtu >= Self.minimumMTU else {
            throw SwiftletError(.invalidArgument, "virtio-net: an MTU of \(mtu) is below the smallest IPv4 allows (\(Self.minimumMTU))")
        }
        try OwnedFileDescriptor.setNonBlocking(fd: backend.rawValue)
        self.mac = mac
        self.mtu = mtu
        self.maximumFrame = Int(mtu) + Self.ethernetHeaderSize
        self.backend = backend
        self.filter = filter
        self.onError = onError
        self.startsThread = startsThread
        self.epoll = try Epoll()
        self.wake = try EventFD()
        self.receive = Mutex(Receive())
        self.transmit = Mutex(Transmit())
        try epoll.add(wake.rawValue, .readable)
    }

    deinit {
        stop()
    }

    /// What the device counted so far.
    public var statistics: Statistics {
        let t = transmit.withLock { $0.statistics }
        let r = receive.withLock { $0.statistics }
        return Statistics(transmittedFrames: t.transmittedFrames, receivedFrames: r.receivedFrames,
                          droppedOversized: t.droppedOversized + r.droppedOversized,
                          droppedMalformed: t.droppedMalformed + r.droppedMalformed,
                          droppedByFilter: t.droppedByFilter + r.droppedByFilter,
                          droppedBackendClosed: t.droppedBackendClosed + r.droppedBackendClosed,
                          droppedNoRoom: t.droppedNoRoom + r.droppedNoRoom,
                          malformedReceiveChains: r.malformedReceiveChains, checksumsCompleted: t.checksumsCompleted)
    }

    /// Bytes held on the device's side in each direction, and filter replies waiting (for bound
    /// checks in tests and the fuzz target).
    package var heldCounts: (transmitBytes: Int, receiveBytes: Int, replies: Int, receiveChains: Int) {
        let t = transmit.withLock { $0.end - $0.sent }
        return receive.withLock { (t, $0.end - $0.start, $0.replies.count, $0.held.count) }
    }

    // MARK: VirtioDevice

    public var deviceType: VirtioDeviceType { .network }
    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors
            | VirtioNetFeature.checksum | VirtioNetFeature.guestChecksum | VirtioNetFeature.mtu | VirtioNetFeature.mac
            | VirtioNetFeature.mergeableReceiveBuffers | VirtioNetFeature.status
    }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize, Self.queueSize] }

    /// Its queues only: frames on their way are not part of a snapshot.
    public var servedQueues: [Virtqueue?]? {
        let t = transmit.withLock { $0.memory == nil ? nil : $0.queue }
        let r = receive.withLock { $0.memory == nil ? nil : $0.queue }
        return [r, t]
    }

    /// virtio_net_config (virtio 1.2, 5.1.4): mac[6], status (LINK_UP), max_virtqueue_pairs (1),
    /// mtu; the rest reads 0.
    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in data.indices {
            let at = offset + i
            switch at {
            case 0..<6: data[i] = mac.bytes[at]
            case 6: data[i] = 1 // VIRTIO_NET_S_LINK_UP
            case 8: data[i] = 1
            case 10: data[i] = UInt8(truncatingIfNeeded: mtu)
            case 11: data[i] = UInt8(truncatingIfNeeded: mtu >> 8)
            default: data[i] = 0
            }
        }
    }

    /// The MAC address is read-only (no VIRTIO_NET_F_CTRL_MAC_ADDR).
    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        guard activation.queues.count == 2, activation.queues[Self.receiveQueue].isReady,
              activation.queues[Self.transmitQueue].isReady else {
            throw SwiftletError(.invalidArgument, "virtio-net: the driver did not set up the receive and transmit queues")
        }
        transmit.withLock { t in
            t.queue = activation.queues[Self.transmitQueue]
            t.memory = activation.memory
            t.interrupt = activation.interrupt
        }
        receive.withLock { r in
            r.queue = activation.queues[Self.receiveQueue]
            r.memory = activation.memory
            r.interrupt = activation.interrupt
            r.mergeable = activation.features & VirtioNetFeature.mergeableReceiveBuffers != 0
            r.dataValid = activation.features & VirtioNetFeature.guestChecksum != 0
        }
        try startLoop()
        wake.signal() // the device's thread starts reading
    }

    /// Forgets the queues. Bytes already in the socket's stream stay (a frame half-sent must be
    /// finished, or the stream's framing breaks); frames read but not delivered wait for the
    /// driver to set the device up again.
    public func reset() {
        transmit.withLock { t in
            t.queue = nil; t.memory = nil; t.interrupt = nil
            t.stalled = false
        }
        receive.withLock { r in
            r.queue = nil; r.memory = nil; r.interrupt = nil
            r.held.removeAll()
            r.heldBytes = 0
            r.replies.removeAll()
        }
        receiveWaiting.store(false, ordering: .relaxed)
        updateWatch { $0.read = false }
    }

    public func queueNotified(_ index: Int) {
        guard !halted.load(ordering: .acquiring) else { return }
        switch index {
        case Self.transmitQueue:
            let (interrupt, replies) = transmit.withLock { t in processTransmit(&t) }
            if replies { wake.signal() }
            interrupt?.signalUsedBuffer()
        case Self.receiveQueue:
            // The device's thread fills receive buffers; it needs waking only when it waits for them.
            if receiveWaiting.exchange(false, ordering: .sequentiallyConsistent) { wake.signal() }
        default:
            break
        }
    }

    /// While quiesced neither the device's thread nor anything else touches guest memory or the
    /// interrupt. Receive chains held for a frame are given back to the ring first, so the
    /// queue's position a snapshot records counts only chains returned to the driver.
    public func setQuiesced(_ quiesced: Bool) {
        transmit.withLock { $0.quiesced = quiesced }
        receive.withLock { r in
            if quiesced, var queue = r.queue, let memory = r.memory, !r.held.isEmpty {
                do throws(SwiftletError) {
                    for _ in r.held { try queue.putBack(memory: memory) }
                    r.queue = queue
                } catch {
                    onError(SwiftletError(error.code, "virtio-net receive queue: \(error.message)"))
                    r.queue = nil
                }
                r.held.removeAll()
                r.heldBytes = 0
            }
            r.quiesced = quiesced
        }
        updateWatch { $0.paused = quiesced }
        if !quiesced { wake.signal() } // catch up with what came meanwhile
    }

    /// Returns at once, from any thread: loops in progress end at their next frame, nothing is
    /// served afterwards.
    public func requestStop() {
        halted.store(true, ordering: .releasing)
        wake.signal()
    }

    /// Stops the device's thread and shuts the socket down (passt reads end of file).
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        requestStop()
        let thread = loop.withLock { t -> OSThread? in defer { t = nil }; return t }
        thread?.join()
        if !backendClosed.exchange(true, ordering: .acquiringAndReleasing) {
            UnixSocket.shutdown(backend.rawValue, .both)
        }
    }

    // MARK: the device's thread

    private func startLoop() throws(SwiftletError) {
        try loop.withLock { t throws(SwiftletError) in
            guard startsThread, t == nil, !halted.load(ordering: .acquiring) else { return }
            t = try OSThread.start(name: "virtio-net") { [self] in runLoop() }
        }
    }

    /// Waits for the socket or a wakeup, then sends what the socket can now take (and the
    /// guest's frames left for it), and fills the receive buffers.
    private func runLoop() {
        // In a confined VMM process, the device threads' own filter on top of the process's,
        // before the guest's first packet (a device that cannot have it serves nothing: its
        // guest sees a dead device).
        var confinement = DeviceThreadConfinement()
        while !halted.load(ordering: .acquiring) {
            let ready = epoll.wait(timeoutMilliseconds: -1)
            wake.drain()
            guard !halted.load(ordering: .acquiring) else { break }
            do throws(SwiftletError) { try confinement.apply() } catch {
                onError(SwiftletError(error.code, "virtio-net: \(error.message)"))
                requestStop()
                return
            }
            for (fd, events) in ready where fd == backend.rawValue && !events.isDisjoint(with: [.hangUp, .error]) {
                // Level-triggered, a hung-up socket would be ready forever: reads and writes find
                // out what is left (the rest of the input, then end of file).
                updateWatch { $0.done = true }
            }
            service()
        }
    }

    /// One turn of the device's thread: sends what waits for the socket (and the guest's frames
    /// left for it), then fills the receive buffers.
    package func service() {
        guard !halted.load(ordering: .acquiring) else { return }
        // Replies the filter queues here are delivered just below.
        let transmitInterrupt = transmit.withLock { t -> VirtioInterrupt? in
            guard t.end > t.sent || t.stalled else { return nil }
            return processTransmit(&t).0
        }
        let receiveInterrupt = receive.withLock { r in pumpReceive(&r) ? r.interrupt : nil }
        transmitInterrupt?.signalUsedBuffer()
        receiveInterrupt?.signalUsedBuffer()
    }

    /// Watches the socket for what the two sides want now (`change` says what changed).
    private func updateWatch(_ change: (inout Watch) -> Void) {
        watch.withLock { w in
            change(&w)
            var wanted: Epoll.Events = []
            if !w.paused && !w.done {
                if w.read { wanted.insert(.readable) }
                if w.write { wanted.insert(.writable) }
            }
            guard wanted.rawValue != w.events || (w.registered && wanted.isEmpty) else { return }
            let fd = backend.rawValue
            do throws(SwiftletError) {
                if wanted.isEmpty {
                    if w.registered { epoll.remove(fd) }
                    w.registered = false
                } else if w.registered {
                    try epoll.modify(fd, wanted)
                } else {
                    try epoll.add(fd, wanted)
                    w.registered = true
                }
                w.events = wanted.rawValue
            } catch {
                report(.epoll, SwiftletError(error.code, "virtio-net: \(error.message)"))
            }
        }
    }

    /// The socket is unusable: shut it down, stop watching it, say so once.
    private func closeBackend(_ error: SwiftletError) {
        guard !backendClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        onError(error)
        UnixSocket.shutdown(backend.rawValue, .both)
        updateWatch { $0.done = true }
    }

    /// Reports an error of kind `kind` the first time only.
    private func report(_ kind: Report, _ error: @autoclosure () -> SwiftletError) {
        let (old, _) = reported.bitwiseOr(kind.rawValue, ordering: .relaxed)
        if old & kind.rawValue == 0 { onError(error()) }
    }

    // MARK: guest → socket

    /// Takes the guest's frames into `staging` and sends them, while the socket takes them and
    /// `staging` has room. Returns the interrupt to raise, if the guest wants one, and whether
    /// the filter queued replies for the guest.
    private func processTransmit(_ t: inout Transmit) -> (VirtioInterrupt?, Bool) {
        flush(&t)
        guard !t.quiesced, var queue = t.queue, let memory = t.memory else { return (nil, false) }
        t.stalled = false
        var used = false, replies = false
        do throws(SwiftletError) {
            while !halted.load(ordering: .relaxed), let chain = try queue.next(memory: memory) {
                switch try take(chain, &t, memory: memory) {
                case .taken(let queuedReplies):
                    replies = replies || queuedReplies
                case .noRoom:
                    try queue.putBack(memory: memory)
                    t.stalled = true
                }
                if t.stalled { break }
                try queue.addUsed(head: chain.head, length: 0, memory: memory)
                used = true
            }
            flush(&t)
            t.queue = queue
            let notify = used ? try queue.shouldInterrupt(memory: memory) : false
            t.queue = queue
            return (notify ? t.interrupt : nil, replies)
        } catch {
            // A ring the device cannot follow: stop serving it until the driver resets the device.
            onError(SwiftletError(error.code, "virtio-net transmit queue: \(error.message)"))
            t.queue = nil
            return (nil, replies)
        }
    }

    enum Taken { case taken(replies: Bool), noRoom }

    /// Takes one transmitted chain: its frame goes to `staging` (behind its length) when it is
    /// well formed and the filter passes it. `noRoom` when `staging` cannot hold it yet.
    private func take(_ chain: DescriptorChain, _ t: inout Transmit, memory: GuestMemory) throws(SwiftletError) -> Taken {
        let total = chain.readableLength
        let header = UInt64(VirtioNetHeader.size)
        guard chain.writable.isEmpty, total >= header + UInt64(Self.ethernetHeaderSize) else {
            t.statistics.droppedMalformed += 1
            report(.malformedTransmit, SwiftletError(.invalidFormat, chain.writable.isEmpty
                ? "virtio-net: the guest sent a frame of \(total) bytes, too short for its 12-byte header and an Ethernet header: dropped"
                : "virtio-net: the guest sent a frame in device-writable buffers: dropped"))
            return .taken(replies: false)
        }
        guard total - header <= UInt64(maximumFrame) else {
            t.statistics.droppedOversized += 1
            report(.oversized, SwiftletError(.invalidFormat, "virtio-net: the guest sent a frame of \(total - header) bytes, more than its MTU of \(mtu) allows: dropped"))
            return .taken(replies: false)
        }
        let length = Int(total - header)
        guard !backendClosed.load(ordering: .acquiring) else {
            t.statistics.droppedBackendClosed += 1
            return .taken(replies: false)
        }
        guard makeRoom(4 + length, &t) else { return .noRoom }
        // The header goes where the frame will start (and is overwritten by it): no other buffer.
        let slot = t.staging.bytes.baseAddress! + t.end
        try gather(chain.readable, from: 0, count: VirtioNetHeader.size, to: slot, memory: memory)
        let h = VirtioNetHeader(bytes: UnsafeRawBufferPointer(start: slot, count: VirtioNetHeader.size))
        try gather(chain.readable, from: header, count: length, to: slot + 4, memory: memory)
        let frame = UnsafeMutableRawBufferPointer(start: slot + 4, count: length)
        guard h.gsoType & 0x7F == VirtioNetHeader.gsoNone else {
            t.statistics.droppedMalformed += 1
            report(.malformedTransmit, SwiftletError(.invalidFormat, "virtio-net: the guest asked for segmentation offload (gso_type \(h.gsoType)), which the device does not offer: frame dropped"))
            return .taken(replies: false)
        }
        if h.flags & VirtioNetHeader.needsChecksum != 0 {
            guard PartialChecksum.complete(frame, start: Int(h.checksumStart), offset: Int(h.checksumOffset)) else {
                t.statistics.droppedMalformed += 1
                report(.malformedTransmit, SwiftletError(.invalidFormat, "virtio-net: the guest's partial checksum (start \(h.checksumStart), offset \(h.checksumOffset)) lies outside its frame of \(length) bytes: dropped"))
                return .taken(replies: false)
            }
            t.statistics.checksumsCompleted += 1
        }
        switch filter?.outbound(UnsafeRawBufferPointer(frame)) ?? .pass {
        case .pass:
            slot.storeBytes(of: UInt32(length).bigEndian, as: UInt32.self)
            t.end += 4 + length
            t.statistics.transmittedFrames += 1
            return .taken(replies: false)
        case .drop:
            t.statistics.droppedByFilter += 1
            return .taken(replies: false)
        case .reply(let frames):
            t.statistics.droppedByFilter += 1
            return .taken(replies: queueReplies(frames))
        }
    }

    /// Queues frames the filter made for the guest, within `maximumPendingReplies`; returns
    /// whether any was queued.
    private func queueReplies(_ frames: [[UInt8]]) -> Bool {
        receive.withLock { r in
            var queued = false
            for frame in frames {
                guard frame.count >= Self.ethernetHeaderSize, frame.count <= maximumFrame,
                      r.replies.count < Self.maximumPendingReplies else {
                    r.statistics.droppedNoRoom += 1
                    continue
                }
                r.replies.append(frame)
                queued = true
            }
            return queued
        }
    }

    /// Copies bytes [from, from + count) of the buffers `descriptors` describe to `destination`.
    private func gather(_ descriptors: [VirtqueueDescriptor], from: UInt64, count: Int, to destination: UnsafeMutableRawPointer,
                        memory: GuestMemory) throws(SwiftletError) {
        var skip = from, copied = 0
        for d in descriptors where copied < count {
            let length = UInt64(d.length)
            if skip >= length { skip -= length; continue }
            let n = min(Int(length - skip), count - copied)
            let source = try memory.hostPointer(d.address + skip, length: UInt64(n))
            (destination + copied).copyMemory(from: source, byteCount: n)
            copied += n
            skip = 0
        }
    }

    /// Makes room for `count` more bytes in `staging`: sends what the socket takes, then moves
    /// what is left to the front. Whether the room is there.
    private func makeRoom(_ count: Int, _ t: inout Transmit) -> Bool {
        let capacity = t.staging.bytes.count
        if capacity - t.end >= count { return true }
        flush(&t)
        if capacity - t.end < count && t.sent > 0 {
            let base = t.staging.bytes.baseAddress!
            base.copyMemory(from: base + t.sent, byteCount: t.end - t.sent)
            t.end -= t.sent
            t.sent = 0
        }
        return capacity - t.end >= count
    }

    /// Sends `staging` to the socket as far as it takes it; watches for room when it does not.
    private func flush(_ t: inout Transmit) {
        let base = t.staging.bytes.baseAddress!
        while t.sent < t.end {
            if backendClosed.load(ordering: .acquiring) {
                t.sent = 0; t.end = 0
                break
            }
            switch UnixSocket.sendSome(backend.rawValue, UnsafeRawBufferPointer(start: base + t.sent, count: t.end - t.sent)) {
            case .moved(let n) where n > 0:
                t.sent += n
            case .wouldBlock:
                updateWatch { $0.write = true }
                return
            case .moved:
                closeBackend(SwiftletError(.systemCall, "virtio-net: the network backend (passt) took no bytes: its connection is closed, and the guest's frames are dropped from now on"))
                t.sent = 0; t.end = 0
            case .failed(let errno):
                closeBackend(SwiftletError(.systemCall, "virtio-net: cannot write to the network backend (passt): the guest's frames are dropped from now on", cause: errno))
                t.sent = 0; t.end = 0
            }
        }
        t.sent = 0; t.end = 0
        updateWatch { $0.write = false }
    }

    // MARK: socket → guest

    enum Delivery { case delivered, waiting, dropped }

    /// Fills the guest's receive buffers: the filter's replies first, then frames from the
    /// socket, reading it while there is a buffer for the next frame. Returns whether the guest
    /// wants an interrupt.
    private func pumpReceive(_ r: inout Receive) -> Bool {
        guard !r.quiesced, var queue = r.queue, let memory = r.memory else { return false }
        r.returned = false
        var broken = false
        defer { r.queue = broken ? nil : queue }
        do throws(SwiftletError) {
            pumping: while !halted.load(ordering: .relaxed) {
                if let reply = r.replies.first {
                    let delivery = reply.withUnsafeBytes { frame -> Result<Delivery, SwiftletError> in
                        do throws(SwiftletError) { return .success(try deliver(frame, &r, &queue, memory)) } catch { return .failure(error) }
                    }
                    if try delivery.get() == .waiting { break pumping }
                    r.replies.removeFirst()
                    continue
                }
                let available = r.end - r.start
                let base = UnsafeRawPointer(r.stream.bytes.baseAddress!)
                if available >= 4 {
                    let length = Int(UInt32(bigEndian: (base + r.start).loadUnaligned(as: UInt32.self)))
                    guard length > 0, length <= Self.maximumStreamFrame else {
                        closeBackend(SwiftletError(.invalidFormat, "virtio-net: the network backend (passt) sent a frame length of \(length) bytes (the stream carries 1 to \(Self.maximumStreamFrame)): its connection is closed, and frames are dropped from now on"))
                        r.start = 0; r.end = 0; r.passes = nil
                        break pumping
                    }
                    if available >= 4 + length {
                        let frame = UnsafeRawBufferPointer(start: base + r.start + 4, count: length)
                        if length < Self.ethernetHeaderSize {
                            r.statistics.droppedMalformed += 1
                        } else if length > maximumFrame {
                            r.statistics.droppedOversized += 1
                        } else {
                            if r.passes == nil {
                                r.passes = (filter?.inbound(frame) ?? .pass) == .pass
                                if r.passes == false { r.statistics.droppedByFilter += 1 }
                            }
                            if r.passes == true, try deliver(frame, &r, &queue, memory) == .waiting { break pumping }
                        }
                        r.start += 4 + length
                        r.passes = nil
                        if r.start == r.end { r.start = 0; r.end = 0 }
                        continue
                    }
                }
                guard try readStream(&r) else { break pumping }
            }
            let returned = r.returned
            return returned ? try queue.shouldInterrupt(memory: memory) : false
        } catch {
            onError(SwiftletError(error.code, "virtio-net receive queue: \(error.message)"))
            broken = true
            r.held.removeAll()
            r.heldBytes = 0
            updateWatch { $0.read = false }
            return false
        }
    }

    /// Reads what the socket has into `stream`; whether anything came (false: wait for the socket).
    private func readStream(_ r: inout Receive) throws(SwiftletError) -> Bool {
        guard !backendClosed.load(ordering: .acquiring) else { return false }
        let capacity = r.stream.bytes.count
        let base = r.stream.bytes.baseAddress!
        if r.start > 0 && capacity - r.end < 4 + Self.maximumStreamFrame {
            base.copyMemory(from: base + r.start, byteCount: r.end - r.start)
            r.end -= r.start
            r.start = 0
        }
        // Only a partial frame is left when the device reads (shorter than the buffer by far), so
        // there is room; a read of nothing would look like end of file.
        guard capacity > r.end else { return false }
        switch OwnedFileDescriptor.readSome(fd: backend.rawValue, into: UnsafeMutableRawBufferPointer(start: base + r.end, count: capacity - r.end)) {
        case .moved(let n) where n > 0:
            r.end += n
            return true
        case .wouldBlock:
            updateWatch { $0.read = true }
            return false
        case .moved:
            closeBackend(SwiftletError(.systemCall, "virtio-net: the network backend (passt) closed its connection: the guest's frames are dropped from now on"))
            return false
        case .failed(let errno):
            closeBackend(SwiftletError(.systemCall, "virtio-net: cannot read from the network backend (passt): the guest's frames are dropped from now on", cause: errno))
            return false
        }
    }

    /// The guest's next receive chain. When there is none the device waits: it says so before
    /// looking again, so a driver that adds a buffer meanwhile and notifies wakes its thread.
    private func nextReceiveChain(_ queue: inout Virtqueue, _ memory: GuestMemory) throws(SwiftletError) -> DescriptorChain? {
        if let chain = try queue.next(memory: memory) { return chain }
        receiveWaiting.store(true, ordering: .sequentiallyConsistent)
        guard let chain = try queue.next(memory: memory) else { return nil }
        receiveWaiting.store(false, ordering: .relaxed)
        return chain
    }

    /// Writes one frame, behind its header, into the guest's receive chains: as many as it needs
    /// with MRG_RXBUF (num_buffers says how many), one without. Chains taken for a frame that
    /// must wait for more stay held for it, so the driver's avail_event asks to hear of new ones.
    private func deliver(_ frame: UnsafeRawBufferPointer, _ r: inout Receive, _ queue: inout Virtqueue,
                         _ memory: GuestMemory) throws(SwiftletError) -> Delivery {
        let needed = UInt64(VirtioNetHeader.size + frame.count)
        let limit = r.mergeable ? Int(queue.size) : 1
        while r.heldBytes < needed {
            guard r.held.count < limit else {
                // The guest's buffers cannot hold it (all of the ring, or one chain without
                // MRG_RXBUF): drop it; the chains stay for the next frame.
                r.statistics.droppedNoRoom += 1
                report(.receiveBuffersTooSmall, SwiftletError(.invalidFormat, "virtio-net: a frame of \(frame.count) bytes does not fit the guest's receive buffers: dropped"))
                return .dropped
            }
            guard let chain = try nextReceiveChain(&queue, memory) else {
                updateWatch { $0.read = false } // until the guest posts buffers (the socket holds passt back)
                return .waiting
            }
            guard chain.readable.isEmpty, chain.writableLength >= UInt64(VirtioNetHeader.size) else {
                r.statistics.malformedReceiveChains += 1
                report(.malformedReceiveChain, SwiftletError(.invalidFormat, "virtio-net: a receive chain has device-readable buffers or room for less than the 12-byte header: returned empty"))
                // Chains held stay the last ones taken (so a quiesce can give them back to the
                // ring): those before this one go back to the driver empty too.
                for held in r.held { try queue.addUsed(head: held.head, length: 0, memory: memory) }
                r.held.removeAll(keepingCapacity: true)
                r.heldBytes = 0
                try queue.addUsed(head: chain.head, length: 0, memory: memory)
                r.returned = true
                continue
            }
            r.held.append(chain)
            r.heldBytes += chain.writableLength
        }
        var count = 0, room: UInt64 = 0
        while room < needed {
            room += r.held[count].writableLength
            count += 1
        }
        let header = r.header.bytes
        VirtioNetHeader(flags: r.dataValid ? VirtioNetHeader.dataValid : 0, numBuffers: UInt16(count)).write(to: header)
        var position = 0
        let total = Int(needed)
        for chain in r.held[0..<count] {
            var written = 0
            for d in chain.writable where position < total {
                let n = min(Int(d.length), total - position)
                guard n > 0 else { continue }
                let destination = try memory.hostPointer(forWriting: d.address, length: UInt64(n))
                var done = 0
                if position < VirtioNetHeader.size {
                    let k = min(n, VirtioNetHeader.size - position)
                    destination.copyMemory(from: header.baseAddress! + position, byteCount: k)
                    done = k
                }
                if done < n {
                    let from = position + done - VirtioNetHeader.size
                    (destination + done).copyMemory(from: frame.baseAddress! + from, byteCount: n - done)
                }
                position += n
                written += n
            }
            try queue.addUsed(head: chain.head, length: UInt32(written), memory: memory)
        }
        if count == r.held.count { r.held.removeAll(keepingCapacity: true) } else { r.held.removeFirst(count) }
        r.heldBytes -= room
        r.returned = true
        r.statistics.receivedFrames += 1
        return .delivered
    }
}
