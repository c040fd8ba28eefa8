import Glibc
import GuestMemory
import Synchronization
import SwiftletSystem
import Virtio

/// Where connections the guest opens to the host (CID 2) go.
public protocol VsockHostPorts: Sendable {
    /// The guest's port `guestPort` connects to host port `port`: return the host end, a connected
    /// stream socket the device will own, or nil to refuse (the guest's connect fails with ECONNRESET).
    func accept(port: UInt32, from guestPort: UInt32) -> Int32?
}

/// A virtio socket device (virtio 1.2, section 5.10) implemented in the VMM, with no vhost: every
/// guest stream connection is bridged to a host stream socket. Guest data is written to the socket;
/// socket data becomes RW packets in the guest's receive queue, within the guest's credit.
///
/// Threads: the guest's notifications arrive on vCPU threads; host sockets are watched by the
/// device's own event-loop thread. Both work under one lock on the connection table.
///
/// Bounds, so a guest can hurt only itself: at most `maximumConnections` connections (each holds
/// one host descriptor and up to `bufferAllocation` bytes of guest data); at most
/// `maximumControlPackets` control packets (RST, RESPONSE, REQUEST, CREDIT_UPDATE) wait for
/// receive buffers, and while that many wait the device leaves the guest's further packets in its
/// transmit queue; a connection the host opened and the guest did not answer within
/// `requestTimeout` is dropped.
///
/// Snapshots hold the queues' positions but no connections: they are host sockets. A restored
/// device tells the driver its transport was reset (the event queue's TRANSPORT_RESET), which
/// resets every connected guest socket; guest programs connect again.
public final class VirtioVsock: VirtioDevice {
    public static let queueSize: UInt16 = 256
    /// Bytes of guest data the device buffers per connection when the host socket is slow.
    public static let bufferAllocation: UInt32 = 256 << 10
    /// Connections per device, both directions: well under a process's usual 1024 descriptors.
    public static let maximumConnections = 256
    /// Control packets that may wait for receive buffers (Firecracker's bound too).
    public static let maximumControlPackets = 256
    static let receiveQueue = 0, transmitQueue = 1, eventQueue = 2
    /// virtio 1.2, 5.10.6.5: the only event there is.
    static let transportResetEvent: UInt32 = 0

    public let guestCID: UInt64
    private let hostPorts: any VsockHostPorts
    private let onError: @Sendable (SwiftletError) -> Void
    private let epoll: Epoll
    private let wake: EventFD
    private let muxer: Mutex<Muxer>
    private let loop = Mutex<OSThread?>(nil)
    private let stopping = Atomic<Bool>(false)
    /// Set by `requestStop` (and `stop`): nothing is served any more.
    private let halted = Atomic<Bool>(false)
    /// How long a connection the host opens waits for the guest's RESPONSE (nanoseconds).
    private let requestTimeout: UInt64

    struct Muxer {
        var receive: Virtqueue?
        var transmit: Virtqueue?
        var event: Virtqueue?
        /// The machine is paused: the event loop leaves guest memory alone.
        var quiesced = false
        /// A TRANSPORT_RESET event waits for an event buffer.
        var transportResetPending = false
        var memory: GuestMemory?
        var interrupt: VirtioInterrupt?
        var connections: [VsockConnection.Key: VsockConnection] = [:]
        var keysByDescriptor: [Int32: VsockConnection.Key] = [:]
        /// Control packets waiting for receive buffers, oldest first; at most `maximumControlPackets`.
        var control: [(key: VsockConnection.Key, operation: VsockHeader.Operation, flags: UInt32)] = []
        /// The guest's packets were left in its transmit queue because `control` was full: they
        /// are taken once receive buffers drain it.
        var transmitStalled = false
        /// A credit update found `control` full: connections are checked again once it drains.
        var creditUpdatesDropped = false
        var nextHostPort: UInt32 = 1 << 30
    }

    /// `requestTimeoutMilliseconds`: how long a connection the host opens waits for the guest to
    /// accept it (Linux's own connect timeout is 2 s).
    public init(guestCID: UInt64 = 3, hostPorts: any VsockHostPorts, requestTimeoutMilliseconds: UInt32 = 2000,
                onError: @escaping @Sendable (SwiftletError) -> Void = { _ in }) throws(SwiftletError) {
        precondition(guestCID > 2 && guestCID < UInt64(UInt32.max), "guest CIDs start at 3")
        self.guestCID = guestCID
        self.requestTimeout = UInt64(requestTimeoutMilliseconds) * 1_000_000
        self.hostPorts = hostPorts
        self.onError = onError
        self.epoll = try Epoll()
        self.wake = try EventFD()
        self.muxer = Mutex(Muxer())
        try epoll.add(wake.rawValue, .readable)
    }

    deinit {
        stop()
    }

    /// Open connections and control packets waiting for receive buffers (for bound checks in
    /// the fuzz target).
    package var queuedCounts: (connections: Int, control: Int) {
        muxer.withLock { ($0.connections.count, $0.control.count) }
    }

    // MARK: VirtioDevice

    public var deviceType: VirtioDeviceType { .vsock }
    public var offeredFeatures: UInt64 { VirtioFeature.version1 | VirtioFeature.eventIndex }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.queueSize] }
    /// Its queues only: connections do not survive a snapshot (`didRestore` resets them).
    public var servedQueues: [Virtqueue?]? {
        muxer.withLock { m in m.memory == nil ? [nil, nil, nil] : [m.receive, m.transmit, m.event] }
    }

    public func setQuiesced(_ quiesced: Bool) {
        let interrupt: VirtioInterrupt? = muxer.withLock { m in
            m.quiesced = quiesced
            guard !quiesced else { return nil }
            // The guest could not answer while paused: pending requests get their full time again.
            let deadline = MonotonicClock.now + requestTimeout
            for (key, c) in m.connections where !c.established { m.connections[key]?.requestDeadline = deadline }
            // Catch up with what the host sent meanwhile.
            let received = service(&m, transmit: false)
            return deliverEvents(&m) || received ? m.interrupt : nil
        }
        if !quiesced { wake.signal() } // the event loop's timeout changed
        interrupt?.signalUsedBuffer()
    }

    /// The connections the guest had are gone: tell its driver, which resets them.
    public func didRestore() {
        let interrupt: VirtioInterrupt? = muxer.withLock { m in
            m.transportResetPending = true
            return deliverEvents(&m) ? m.interrupt : nil
        }
        interrupt?.signalUsedBuffer()
    }

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in data.indices {
            let at = offset + i
            data[i] = at < 8 ? UInt8(truncatingIfNeeded: guestCID >> (8 * UInt64(at))) : 0
        }
    }

    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        guard activation.queues.count == 3, activation.queues[Self.receiveQueue].isReady,
              activation.queues[Self.transmitQueue].isReady else {
            throw SwiftletError(.invalidArgument, "virtio-vsock: the driver did not set up the receive and transmit queues")
        }
        muxer.withLock { m in
            m.receive = activation.queues[Self.receiveQueue]
            m.transmit = activation.queues[Self.transmitQueue]
            m.event = activation.queues[Self.eventQueue].isReady ? activation.queues[Self.eventQueue] : nil
            m.memory = activation.memory
            m.interrupt = activation.interrupt
        }
        try startLoop()
    }

    public func reset() {
        muxer.withLock { m in
            for key in Array(m.connections.keys) { closeConnection(key, &m) }
            let quiesced = m.quiesced
            m = Muxer()
            m.quiesced = quiesced
        }
    }

    public func queueNotified(_ index: Int) {
        guard !halted.load(ordering: .acquiring) else { return }
        let interrupt: VirtioInterrupt? = muxer.withLock { m in
            var notify = false
            if index == Self.eventQueue { notify = deliverEvents(&m) }
            notify = service(&m, transmit: index == Self.transmitQueue) || notify
            return notify ? m.interrupt : nil
        }
        interrupt?.signalUsedBuffer()
    }

    /// The machine is ending: loops in progress end at their next packet and nothing is served
    /// any more; the connections stay open until `stop`. Returns at once, from any thread.
    public func requestStop() {
        halted.store(true, ordering: .releasing)
        wake.signal()
    }

    // MARK: host side

    /// Opens a connection from the host to the guest's `port`; returns the host end (a connected
    /// stream socket the caller owns). Data written to it reaches the guest once the guest accepts;
    /// if nothing listens there, the guest resets the connection and the socket reads end of file.
    public func connect(toGuestPort port: UInt32) throws(SwiftletError) -> OwnedFileDescriptor {
        let pair = try UnixSocket.pair()
        let device = pair.first.rawValue
        try? OwnedFileDescriptor.setNonBlocking(fd: device)
        let (accepted, interrupt) = muxer.withLock { m -> (Bool, VirtioInterrupt?) in
            guard m.connections.count < Self.maximumConnections, m.control.count < Self.maximumControlPackets,
                  m.memory != nil, !halted.load(ordering: .acquiring) else { return (false, nil) }
            var hostPort = m.nextHostPort
            while m.connections.keys.contains(where: { $0.hostPort == hostPort }) { hostPort &+= 1 }
            m.nextHostPort = hostPort &+ 1 < 1 << 30 ? 1 << 30 : hostPort &+ 1
            let key = VsockConnection.Key(hostPort: hostPort, guestPort: port)
            var connection = VsockConnection(fd: device, established: false)
            connection.requestDeadline = MonotonicClock.now + requestTimeout
            m.connections[key] = connection
            m.keysByDescriptor[device] = key
            enqueueControl(key, .request, &m)
            return (true, pumpReceive(&m) ? m.interrupt : nil)
        }
        wake.signal() // the event loop now has a request to time out
        // The connection owns the device's end now; a refused one closes it, and the caller's
        // end reads end of file.
        if accepted { _ = pair.first.release() }
        interrupt?.signalUsedBuffer()
        return pair.second
    }

    /// Stops the event loop and closes every connection, so host peers see end of file (the VMM
    /// calls this when the machine ends).
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        requestStop()
        let thread = loop.withLock { t -> OSThread? in defer { t = nil }; return t }
        thread?.join()
        muxer.withLock { m in
            for key in Array(m.connections.keys) { closeConnection(key, &m) }
            m.control.removeAll()
        }
    }

    /// Control packets waiting for receive buffers, and open connections (for tests).
    var pendingControlPackets: Int { muxer.withLock { $0.control.count } }
    var connectionCount: Int { muxer.withLock { $0.connections.count } }

    private func startLoop() throws(SwiftletError) {
        try loop.withLock { t throws(SwiftletError) in
            guard t == nil, !halted.load(ordering: .acquiring) else { return }
            t = try OSThread.start(name: "vsock") { [self] in runLoop() }
        }
    }

    /// The event loop: host sockets that became readable or writable feed the guest, and
    /// requests the guest leaves unanswered expire.
    private func runLoop() {
        // In a confined VMM process, the device threads' own filter on top of the process's,
        // before the guest's first packet (a device that cannot have it serves nothing: its
        // guest sees a dead device).
        var confinement = DeviceThreadConfinement()
        var timeout: Int32 = -1
        while !halted.load(ordering: .acquiring) {
            let ready = epoll.wait(timeoutMilliseconds: timeout)
            wake.drain()
            guard !halted.load(ordering: .acquiring) else { break }
            do throws(SwiftletError) { try confinement.apply() } catch {
                onError(SwiftletError(error.code, "vsock: \(error.message)"))
                requestStop()
                return
            }
            let interrupt: VirtioInterrupt? = muxer.withLock { m in
                defer { timeout = nextRequestTimeout(m) }
                expireRequests(&m)
                for (fd, events) in ready where fd != wake.rawValue {
                    guard let key = m.keysByDescriptor[fd], m.connections[key] != nil else { continue }
                    if events.contains(.writable) { flushToHost(key, &m) }
                    if !events.isDisjoint(with: [.readable, .hangUp, .error]) {
                        m.connections[key]?.hostReadable = true
                        refreshInterest(key, &m)
                    }
                }
                return pumpReceive(&m) ? m.interrupt : nil
            }
            interrupt?.signalUsedBuffer()
        }
    }

    /// Milliseconds until the first host-initiated request expires (at least 1), or -1 for none.
    private func nextRequestTimeout(_ m: Muxer) -> Int32 {
        guard !m.quiesced, let first = m.connections.values.compactMap({ $0.established ? nil : $0.requestDeadline }).min() else {
            return -1
        }
        let now = MonotonicClock.now
        return first <= now ? 1 : Int32(clamping: (first - now + 999_999) / 1_000_000)
    }

    /// Drops the connections the host opened that the guest did not accept in time: the host
    /// peer reads end of file, the guest gets a RST should it answer after all.
    private func expireRequests(_ m: inout Muxer) {
        guard !m.quiesced else { return }
        let now = MonotonicClock.now
        for (key, c) in m.connections where !c.established && (c.requestDeadline ?? .max) <= now {
            closeConnection(key, &m)
            enqueueControl(key, .reset, &m)
        }
    }

    /// Serves the queues: the guest's packets (when it notified the transmit queue, or when an
    /// earlier pass left them because `control` was full), then the receive buffers, and again
    /// while these make room for the packets left. Returns whether the guest wants an interrupt.
    private func service(_ m: inout Muxer, transmit: Bool) -> Bool {
        var notify = false
        if transmit || m.transmitStalled { notify = processTransmit(&m) }
        notify = pumpReceive(&m) || notify
        while m.transmitStalled && m.control.count < Self.maximumControlPackets && !halted.load(ordering: .relaxed) {
            notify = processTransmit(&m) || notify
            notify = pumpReceive(&m) || notify
        }
        return notify
    }

    /// Queues a control packet for the guest. A full queue drops it: only a guest that gives no
    /// receive buffers fills it, and the device then takes no more of its packets (dropped credit
    /// updates are made up once the queue drains).
    private func enqueueControl(_ key: VsockConnection.Key, _ operation: VsockHeader.Operation, _ m: inout Muxer) {
        guard m.control.count < Self.maximumControlPackets else {
            if operation == .creditUpdate { m.creditUpdatesDropped = true }
            return
        }
        m.control.append((key, operation, 0))
    }

    // MARK: guest → host

    /// Handles the packets the guest queued, while `control` has room for what they answer (each
    /// packet queues at most one control packet); returns whether the guest wants an interrupt.
    private func processTransmit(_ m: inout Muxer) -> Bool {
        m.transmitStalled = false
        guard var queue = m.transmit, let memory = m.memory else { return false }
        var broken = false
        defer { m.transmit = broken ? nil : queue }
        do throws(SwiftletError) {
            var used = false
            defer { m.transmitStalled = m.control.count >= Self.maximumControlPackets }
            while m.control.count < Self.maximumControlPackets, !halted.load(ordering: .relaxed),
                  let chain = try queue.next(memory: memory) {
                let head = try chain.readPrefix(VsockHeader.size, memory: memory)
                if head.count == VsockHeader.size {
                    let header = VsockHeader(bytes: head)
                    let payload = DescriptorChain.segments(chain.readable, skipping: UInt64(VsockHeader.size),
                                                          keeping: UInt64(header.length))
                    handle(header, payload: payload, memory: memory, &m)
                } else {
                    onError(SwiftletError(.invalidFormat, "virtio-vsock: a transmitted packet is shorter than its header"))
                }
                try queue.addUsed(head: chain.head, length: 0, memory: memory)
                used = true
            }
            return used ? try queue.shouldInterrupt(memory: memory) : false
        } catch {
            // A ring the device cannot follow: stop serving it until the driver resets the device.
            onError(SwiftletError(error.code, "virtio-vsock transmit queue: \(error.message)"))
            broken = true
            return false
        }
    }

    private func handle(_ header: VsockHeader, payload: [DescriptorChain.Segment], memory: GuestMemory, _ m: inout Muxer) {
        let key = VsockConnection.Key(hostPort: header.destinationPort, guestPort: header.sourcePort)
        guard let operation = header.op, header.type == VsockHeader.typeStream,
              header.sourceCID == guestCID, header.destinationCID == VsockHeader.hostCID else {
            if header.op != .reset { enqueueControl(key, .reset, &m) }
            return
        }
        if operation != .request, m.connections[key] == nil {
            if operation != .reset { enqueueControl(key, .reset, &m) }
            return
        }
        m.connections[key]?.updatePeerCredit(header)
        switch operation {
        case .request:
            guard m.connections[key] == nil, m.connections.count < Self.maximumConnections,
                  let fd = hostPorts.accept(port: header.destinationPort, from: header.sourcePort) else {
                enqueueControl(key, .reset, &m)
                return
            }
            try? OwnedFileDescriptor.setNonBlocking(fd: fd)
            var connection = VsockConnection(fd: fd, established: true)
            connection.updatePeerCredit(header)
            m.connections[key] = connection
            m.keysByDescriptor[fd] = key
            enqueueControl(key, .response, &m)
            refreshInterest(key, &m)
        case .response:
            guard m.connections[key]?.established == false else {
                closeConnection(key, &m)
                enqueueControl(key, .reset, &m)
                return
            }
            m.connections[key]?.established = true
            refreshInterest(key, &m)
        case .readWrite:
            guard let c = m.connections[key], c.established, c.guestShutdown & VsockHeader.shutdownSend == 0 else {
                closeConnection(key, &m)
                enqueueControl(key, .reset, &m)
                return
            }
            let length = payload.reduce(0) { $0 + Int($1.length) }
            guard c.pendingToHost.count + length <= Int(Self.bufferAllocation) else {
                // The guest ignored our credit: that stream cannot be trusted any more.
                onError(SwiftletError(.invalidFormat, "virtio-vsock: guest port \(key.guestPort) overran its credit"))
                closeConnection(key, &m)
                enqueueControl(key, .reset, &m)
                return
            }
            for segment in payload {
                guard let bytes = try? memory.read(count: Int(segment.length), at: segment.address) else { continue }
                m.connections[key]?.pendingToHost += bytes
            }
            flushToHost(key, &m)
        case .shutdown:
            m.connections[key]?.guestShutdown |= header.flags & (VsockHeader.shutdownReceive | VsockHeader.shutdownSend)
            if m.connections[key]?.guestShutdown == VsockHeader.shutdownReceive | VsockHeader.shutdownSend {
                // Both directions closed: the guest waits for our RST to finish closing.
                closeConnection(key, &m)
                enqueueControl(key, .reset, &m)
                return
            }
            flushToHost(key, &m)
            refreshInterest(key, &m)
        case .reset:
            closeConnection(key, &m)
        case .creditUpdate:
            refreshInterest(key, &m)
        case .creditRequest:
            enqueueControl(key, .creditUpdate, &m)
        }
    }

    /// Writes what the guest sent to the host socket, as far as it takes it.
    private func flushToHost(_ key: VsockConnection.Key, _ m: inout Muxer) {
        guard var c = m.connections[key] else { return }
        sending: while !c.pendingToHost.isEmpty {
            switch c.pendingToHost.withUnsafeBytes({ UnixSocket.sendSome(c.fd, $0) }) {
            case .moved(let n) where n > 0:
                c.pendingToHost.removeFirst(n)
                c.forwardCount &+= UInt32(n)
            case .wouldBlock:
                break sending
            case .moved, .failed:
                // The host end is gone: reset the guest's side.
                m.connections[key] = c
                closeConnection(key, &m)
                enqueueControl(key, .reset, &m)
                return
            }
        }
        if c.pendingToHost.isEmpty && c.guestShutdown & VsockHeader.shutdownSend != 0 && !c.hostWriteShut {
            UnixSocket.shutdown(c.fd, .writing)
            c.hostWriteShut = true
        }
        if c.needsCreditUpdate(bufferAllocation: Self.bufferAllocation) && !m.control.contains(where: { $0.key == key && $0.operation == .creditUpdate }) {
            enqueueControl(key, .creditUpdate, &m)
        }
        m.connections[key] = c
        refreshInterest(key, &m)
    }

    // MARK: host → guest

    /// Fills the guest's receive buffers: control packets first, then data from readable host
    /// sockets within each connection's credit. Returns whether the guest wants an interrupt.
    private func pumpReceive(_ m: inout Muxer) -> Bool {
        guard !m.quiesced, var queue = m.receive, let memory = m.memory else { return false }
        var broken = false
        defer { m.receive = broken ? nil : queue }
        var used = false
        do throws(SwiftletError) {
            while !halted.load(ordering: .relaxed) {
                if m.control.isEmpty && m.creditUpdatesDropped {
                    m.creditUpdatesDropped = false
                    for (key, c) in m.connections where c.needsCreditUpdate(bufferAllocation: Self.bufferAllocation) {
                        enqueueControl(key, .creditUpdate, &m)
                    }
                }
                if let packet = m.control.first {
                    guard let chain = try queue.next(memory: memory) else { break }
                    m.control.removeFirst()
                    var header = self.header(for: packet.key, operation: packet.operation, &m)
                    header.flags = packet.flags
                    try chain.writePrefix(header.bytes, memory: memory)
                    try queue.addUsed(head: chain.head, length: UInt32(VsockHeader.size), memory: memory)
                    used = true
                    continue
                }
                guard let key = m.connections.first(where: { $0.value.hostReadable && $0.value.canSendToGuest && $0.value.guestCredit > 0 })?.key,
                      let chain = try queue.next(memory: memory) else { break }
                guard chain.writableLength > UInt64(VsockHeader.size) else {
                    try queue.addUsed(head: chain.head, length: 0, memory: memory) // too small to carry data
                    used = true
                    continue
                }
                let c = m.connections[key]!
                let room = min(chain.writableLength - UInt64(VsockHeader.size), UInt64(c.guestCredit))
                let segments = DescriptorChain.segments(chain.writable, skipping: UInt64(VsockHeader.size), keeping: room)
                let n = try readFromHost(c.fd, into: segments, memory: memory)
                switch n {
                case .some(let count) where count > 0:
                    m.connections[key]!.sentToGuest &+= UInt32(count)
                    var header = self.header(for: key, operation: .readWrite, &m)
                    header.length = UInt32(count)
                    try chain.writePrefix(header.bytes, memory: memory)
                    try queue.addUsed(head: chain.head, length: UInt32(VsockHeader.size + count), memory: memory)
                    used = true
                case .some:
                    // End of file: the host will send no more.
                    m.connections[key]!.hostEOF = true
                    m.connections[key]!.hostReadable = false
                    var header = self.header(for: key, operation: .shutdown, &m)
                    header.flags = VsockHeader.shutdownSend
                    try chain.writePrefix(header.bytes, memory: memory)
                    try queue.addUsed(head: chain.head, length: UInt32(VsockHeader.size), memory: memory)
                    used = true
                    refreshInterest(key, &m)
                case .none:
                    // Nothing to read after all: give the buffer back and wait for the socket.
                    try queue.putBack(memory: memory)
                    m.connections[key]!.hostReadable = false
                    refreshInterest(key, &m)
                }
            }
            // Sockets with data but no buffer or credit stop being watched until either arrives.
            for key in m.connections.keys where m.connections[key]!.hostReadable { refreshInterest(key, &m) }
            return used ? try queue.shouldInterrupt(memory: memory) : false
        } catch {
            onError(SwiftletError(error.code, "virtio-vsock receive queue: \(error.message)"))
            broken = true
            return false
        }
    }

    /// Puts a pending TRANSPORT_RESET in an event buffer; returns whether the guest wants an interrupt.
    private func deliverEvents(_ m: inout Muxer) -> Bool {
        guard m.transportResetPending, !m.quiesced, var queue = m.event, let memory = m.memory else { return false }
        do throws(SwiftletError) {
            guard let chain = try queue.next(memory: memory) else { return false }
            let event = LittleEndian.bytes(UInt64(Self.transportResetEvent), 4)
            let delivered = try chain.writePrefix(event, memory: memory) == event.count
            if delivered {
                m.transportResetPending = false
            } else {
                // Given back empty; the event waits for the next buffer.
                onError(SwiftletError(.invalidFormat, "virtio-vsock: an event buffer is shorter than an event"))
            }
            try queue.addUsed(head: chain.head, length: delivered ? UInt32(event.count) : 0, memory: memory)
            m.event = queue
            return try queue.shouldInterrupt(memory: memory)
        } catch {
            onError(SwiftletError(error.code, "virtio-vsock event queue: \(error.message)"))
            m.event = nil
            return false
        }
    }

    /// Reads from a host socket straight into guest buffers: the byte count (0 at end of file),
    /// or nil when nothing is there. A failed socket reads as end of file.
    private func readFromHost(_ fd: Int32, into segments: [DescriptorChain.Segment], memory: GuestMemory) throws(SwiftletError) -> Int? {
        var buffers: [UnsafeMutableRawBufferPointer] = []
        for segment in segments {
            let p = try memory.hostPointer(forWriting: segment.address, length: segment.length)
            // SAFETY: hostPointer checked that the segment lies inside guest memory.
            buffers.append(UnsafeMutableRawBufferPointer(start: p, count: Int(segment.length)))
        }
        switch OwnedFileDescriptor.readSome(fd: fd, into: buffers) {
        case .moved(let n): return n
        case .wouldBlock: return nil
        case .failed: return 0
        }
    }

    /// A header from the host to the guest for `key`, carrying our current credit.
    private func header(for key: VsockConnection.Key, operation: VsockHeader.Operation, _ m: inout Muxer) -> VsockHeader {
        let forward = m.connections[key]?.forwardCount ?? 0
        m.connections[key]?.advertisedForwardCount = forward
        return VsockHeader(sourceCID: VsockHeader.hostCID, destinationCID: guestCID, sourcePort: key.hostPort,
                           destinationPort: key.guestPort, operation: operation,
                           bufferAllocation: Self.bufferAllocation, forwardCount: forward)
    }

    /// Watches the socket for what the connection needs now: input while the guest can take it
    /// and none is known to be waiting, output while guest data is queued.
    private func refreshInterest(_ key: VsockConnection.Key, _ m: inout Muxer) {
        guard var c = m.connections[key] else { return }
        var wanted: Epoll.Events = []
        if c.canSendToGuest && !c.hostReadable { wanted.insert(.readable) }
        if !c.pendingToHost.isEmpty { wanted.insert(.writable) }
        // A socket at end of file with nothing to write would report hang-up forever: drop it.
        let watch = !(wanted.isEmpty && c.hostEOF) && c.established
        do throws(SwiftletError) {
            if watch && !c.registered {
                try epoll.add(c.fd, wanted)
                c.registered = true
            } else if watch && wanted.rawValue != c.interest {
                try epoll.modify(c.fd, wanted)
            } else if !watch && c.registered {
                epoll.remove(c.fd)
                c.registered = false
            }
            c.interest = wanted.rawValue
        } catch {
            onError(SwiftletError(error.code, "virtio-vsock: \(error.message)"))
        }
        m.connections[key] = c
    }

    private func closeConnection(_ key: VsockConnection.Key, _ m: inout Muxer) {
        guard let c = m.connections.removeValue(forKey: key) else { return }
        if c.registered { epoll.remove(c.fd) }
        m.keysByDescriptor[c.fd] = nil
        OwnedFileDescriptor.close(raw: c.fd)
        m.control.removeAll { $0.key == key && $0.operation != .reset }
    }
}
