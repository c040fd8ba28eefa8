import Glibc
import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

/// Host ports for tests: port 1024 accepts (the test keeps the other end), others refuse.
final class TestPorts: VsockHostPorts {
    let accepted = Mutex<[Int32]>([])
    /// When set, each new connection's host socket starts full (the device can write nothing
    /// to it until the test reads); `prefilled` counts the filler bytes the test must read first.
    let startFull = Atomic<Bool>(false)
    let prefilled = Atomic<Int>(0)
    func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        guard port == 1024 else { return nil }
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { return nil }
        if startFull.load(ordering: .relaxed) {
            let filler = [UInt8](repeating: 0xee, count: 4096)
            while case let n = filler.withUnsafeBytes({ send(pair[0], $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }), n > 0 {
                prefilled.add(n, ordering: .relaxed)
            }
        }
        accepted.withLock { $0.append(pair[1]) }
        return pair[0]
    }
}

/// The guest's side of a virtio-vsock device, laid out as Linux 6.1's driver does it: receive
/// buffers of a 44-byte header and a 4 KiB payload, transmitted packets as header + payload.
struct VsockGuest {
    static let cid: UInt64 = 3
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 8 << 20)])
    var rx: VirtqueueDriver
    var tx: VirtqueueDriver
    var event: VirtqueueDriver
    /// Event buffers by chain head.
    var eventBuffers: [UInt16: GuestAddress] = [:]
    var device: VirtioVsock
    let ports = TestPorts()
    let warnings = WarningLog()
    /// Receive buffers by chain head: (header, payload).
    var buffers: [UInt16: (GuestAddress, GuestAddress)] = [:]
    var consumed: UInt16 = 0

    init(receiveBuffers: Int = 32, requestTimeoutMilliseconds: UInt32 = 2000) throws {
        rx = VirtqueueDriver(memory: memory, size: 64, base: GuestAddress(0x10000))
        tx = VirtqueueDriver(memory: memory, size: 64, base: GuestAddress(0x200000))
        let warnings = self.warnings
        device = try VirtioVsock(guestCID: Self.cid, hostPorts: ports, requestTimeoutMilliseconds: requestTimeoutMilliseconds, onError: { e in warnings.withLock { $0.append(e.description) } })
        event = VirtqueueDriver(memory: memory, size: 64, base: GuestAddress(0x400000))
        for _ in 0..<4 {
            let buffer = try event.buffer(4)
            let head = try event.chain([(buffer, 4, true)])
            eventBuffers[head] = buffer
            try event.publish(head)
        }
        try device.activate(VirtioActivation(memory: memory, queues: [rx.queue(), tx.queue(), event.queue()],
                                             features: device.offeredFeatures, interrupt: VirtioInterrupt(line: CountingLine())))
        for _ in 0..<receiveBuffers {
            let header = try rx.buffer(44), payload = try rx.buffer(4096)
            let head = try rx.chain([(header, 44, true), (payload, 4096, true)])
            buffers[head] = (header, payload)
            try rx.publish(head)
        }
    }

    /// Gives the device `count` more receive buffers (header and 4 KiB of payload each) and
    /// notifies the receive queue.
    mutating func postReceiveBuffers(_ count: Int) throws {
        for _ in 0..<count {
            let header = try rx.buffer(44), payload = try rx.buffer(4096)
            let head = try rx.chain([(header, 44, true), (payload, 4096, true)])
            buffers[head] = (header, payload)
            try rx.publish(head)
        }
        device.queueNotified(0)
    }

    /// The packets the device has put in the receive queue so far, without waiting.
    mutating func receiveAvailable() throws -> [VsockHeader] {
        var headers: [VsockHeader] = []
        while try rx.usedIndex != consumed, let packet = try receive() { headers.append(packet.header) }
        return headers
    }

    /// Sends a packet from guest port `from` to host port `to`.
    mutating func send(_ operation: VsockHeader.Operation, from: UInt32 = 5000, to: UInt32 = 1024, payload: [UInt8] = [],
                       flags: UInt32 = 0, bufferAllocation: UInt32 = 65536, forwardCount: UInt32 = 0, type: UInt16 = 1) throws {
        let header = VsockHeader(sourceCID: Self.cid, destinationCID: 2, sourcePort: from, destinationPort: to,
                                 length: UInt32(payload.count), type: type, operation: operation, flags: flags,
                                 bufferAllocation: bufferAllocation, forwardCount: forwardCount)
        var parts = [(try tx.buffer(44, bytes: header.bytes), UInt32(44), false)]
        if !payload.isEmpty { parts.append((try tx.buffer(payload.count, bytes: payload), UInt32(payload.count), false)) }
        try tx.publish(try tx.chain(parts))
        device.queueNotified(1)
    }

    /// Opens a connection from guest port 5000 to host port 1024; returns the host's end.
    mutating func connect(bufferAllocation: UInt32 = 65536) throws -> Int32 {
        try send(.request, bufferAllocation: bufferAllocation)
        #expect(try receive()?.header.op == .response)
        return try #require(ports.accepted.withLock { $0.last })
    }

    /// The next packet the device put in the receive queue, waiting up to 2 s for the event loop.
    mutating func receive() throws -> (header: VsockHeader, payload: [UInt8])? {
        for _ in 0..<200 {
            if try rx.usedIndex != consumed {
                let (head, length) = try rx.used(consumed)
                consumed &+= 1
                let (headerAddress, payloadAddress) = buffers[head]!
                let header = VsockHeader(bytes: try memory.read(count: 44, at: headerAddress))
                #expect(Int(length) == 44 + Int(header.length))
                return (header, try memory.read(count: Int(header.length), at: payloadAddress))
            }
            usleep(10_000)
        }
        return nil
    }

    /// Receives RW packets until `count` payload bytes have arrived.
    mutating func receiveData(_ count: Int) throws -> [UInt8] {
        var data: [UInt8] = []
        while data.count < count, let packet = try receive() {
            #expect(packet.header.op == .readWrite)
            data += packet.payload
        }
        return data
    }
}

func readAll(_ fd: Int32, count: Int) -> [UInt8] {
    var result: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while result.count < count {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, min($0.count, count - result.count)) }
        if n <= 0 { break }
        result += buffer[0..<n]
    }
    return result
}

func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if n <= 0 { return }
        done += n
    }
}

@Suite(.serialized) struct VirtioVsockTests {
    @Test func advertisesTheGuestCID() throws {
        let guest = try VsockGuest(receiveBuffers: 0)
        defer { guest.device.stop() }
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.withUnsafeMutableBytes { guest.device.readConfiguration(offset: 0, into: $0) }
        #expect(bytes == [3, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test func guestConnectsAndBytesFlowBothWaysUntilAnOrderlyClose() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        try guest.send(.request)
        let response = try #require(try guest.receive())
        #expect(response.header.op == .response)
        #expect(response.header.sourcePort == 1024 && response.header.destinationPort == 5000)
        #expect(response.header.destinationCID == 3 && response.header.sourceCID == 2)
        #expect(response.header.bufferAllocation == VirtioVsock.bufferAllocation)
        let host = try #require(guest.ports.accepted.withLock { $0.first })
        defer { close(host) }

        try guest.send(.readWrite, payload: Array("hello host".utf8))
        #expect(readAll(host, count: 10) == Array("hello host".utf8))

        let big = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        writeAll(host, big)
        #expect(try guest.receiveData(big.count) == big, "host data arrives whole and in order, in 4 KiB packets")

        // The host closes: the guest hears SHUTDOWN(send); the guest closes: it gets RST.
        shutdown(host, Int32(SHUT_WR))
        let eof = try #require(try guest.receive())
        #expect(eof.header.op == .shutdown && eof.header.flags == VsockHeader.shutdownSend)
        try guest.send(.shutdown, flags: VsockHeader.shutdownSend | VsockHeader.shutdownReceive)
        let reset = try #require(try guest.receive())
        #expect(reset.header.op == .reset)
        #expect(readAll(host, count: 1).isEmpty, "the device closed its end")
    }

    @Test func guestShutdownOfSendingEndsTheHostsInput() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect()
        defer { close(host) }
        try guest.send(.readWrite, payload: [1, 2, 3])
        try guest.send(.shutdown, flags: VsockHeader.shutdownSend)
        #expect(readAll(host, count: 100) == [1, 2, 3], "data, then end of file")
        writeAll(host, [9])
        #expect(try guest.receiveData(1) == [9], "the other direction still works")
    }

    @Test func nothingListeningMeansReset() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        try guest.send(.request, to: 7777)
        #expect(try guest.receive()?.header.op == .reset)
        try guest.send(.readWrite, from: 6000, payload: [1]) // no such connection
        #expect(try guest.receive()?.header.op == .reset)
        try guest.send(.request, type: 2) // SEQPACKET is not offered
        #expect(try guest.receive()?.header.op == .reset)
    }

    @Test func hostDataRespectsTheGuestsCredit() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect(bufferAllocation: 10)
        defer { close(host) }
        writeAll(host, [UInt8](repeating: 0x42, count: 100))
        #expect(try guest.receiveData(10).count == 10)
        usleep(100_000)
        #expect(try guest.rx.usedIndex == guest.consumed, "no more than the credit until the guest frees space")
        try guest.send(.creditUpdate, bufferAllocation: 10, forwardCount: 10)
        #expect(try guest.receiveData(10).count == 10)
    }

    @Test func creditRequestsAreAnsweredWithTheForwardCount() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect()
        defer { close(host) }
        try guest.send(.readWrite, payload: [UInt8](repeating: 1, count: 1000))
        _ = readAll(host, count: 1000)
        try guest.send(.creditRequest)
        let update = try #require(try guest.receive())
        #expect(update.header.op == .creditUpdate && update.header.forwardCount == 1000)
    }

    @Test func aGuestThatOverrunsItsCreditIsReset() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect()
        defer { close(host) }
        // Fill the host socket so nothing drains, then send past the 256 KiB allocation.
        _ = fcntl(host, F_SETFL, O_NONBLOCK)
        let chunk = [UInt8](repeating: 7, count: 4096)
        for _ in 0..<(Int(VirtioVsock.bufferAllocation) / 4096 + 64) { try guest.send(.readWrite, payload: chunk) }
        var sawReset = false
        while let packet = try guest.receive() { if packet.header.op == .reset { sawReset = true; break } }
        #expect(sawReset)
        #expect(guest.warnings.withLock { $0 }.contains { $0.contains("overran its credit") })
    }

    @Test func hostInitiatedConnections() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.device.connect(toGuestPort: 80)
        let request = try #require(try guest.receive())
        #expect(request.header.op == .request && request.header.destinationPort == 80)
        let hostPort = request.header.sourcePort
        try guest.send(.response, from: 80, to: hostPort)
        writeAll(host.rawValue, Array("GET /".utf8))
        #expect(try guest.receiveData(5) == Array("GET /".utf8))
        try guest.send(.readWrite, from: 80, to: hostPort, payload: Array("200".utf8))
        #expect(readAll(host.rawValue, count: 3) == Array("200".utf8))
        try guest.send(.reset, from: 80, to: hostPort)
        #expect(readAll(host.rawValue, count: 1).isEmpty, "a reset closes the host end")

        // A refused connection (the guest answers RST) ends the host socket too.
        let refused = try guest.device.connect(toGuestPort: 81)
        let second = try #require(try guest.receive())
        try guest.send(.reset, from: 81, to: second.header.sourcePort)
        #expect(readAll(refused.rawValue, count: 1).isEmpty)
    }

    @Test func resetClosesEveryConnection() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect()
        defer { close(host) }
        guest.device.reset()
        #expect(readAll(host, count: 1).isEmpty)
    }
}

@Suite struct VirtioVsockStopTests {
    @Test func stoppingTheDeviceEndsEveryHostConnection() throws {
        var guest = try VsockGuest()
        let host = try guest.connect()
        defer { close(host) }
        guest.device.stop()
        #expect(readAll(host, count: 1).isEmpty, "a stopped device closes its sockets")
    }
}

/// What a snapshot keeps of a vsock device (its queues) and what a restore does with the rest:
/// connections are host sockets, so the restored device tells the driver they were reset.
@Suite(.serialized) struct VirtioVsockSnapshotTests {
    @Test func aQuiescedDeviceLeavesGuestMemoryAloneAndCatchesUpAfterwards() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        let host = try guest.connect()
        defer { close(host) }
        guest.device.setQuiesced(true)
        let usedBefore = try guest.rx.usedIndex
        writeAll(host, Array("sent while paused".utf8))
        usleep(100_000) // the event loop sees the data; a quiesced device must not deliver it
        #expect(try guest.rx.usedIndex == usedBefore)
        guest.device.setQuiesced(false)
        #expect(try guest.receiveData(17) == Array("sent while paused".utf8))
    }

    @Test func aRestoredDeviceGoesOnFromItsQueuesAndResetsTheGuestsConnections() throws {
        var guest = try VsockGuest()
        let host = try guest.connect()
        defer { close(host) }
        guest.device.setQuiesced(true)
        let saved = try #require(guest.device.servedQueues)
        #expect(saved.count == 3 && saved.allSatisfy { $0 != nil })
        #expect(try guest.event.usedIndex == 0, "no event before a restore")
        guest.device.stop()
        #expect(readAll(host, count: 1).isEmpty, "the host end of a connection ends with its device")

        // A new device over the same memory, as a restore makes it.
        let restored = try VirtioVsock(guestCID: VsockGuest.cid, hostPorts: guest.ports)
        defer { restored.stop() }
        try restored.activate(VirtioActivation(memory: guest.memory, queues: saved.map { $0! }, features: restored.offeredFeatures,
                                               interrupt: VirtioInterrupt(line: CountingLine())))
        restored.didRestore()
        #expect(try guest.event.usedIndex == 1)
        let (head, length) = try guest.event.used(0)
        #expect(length == 4)
        #expect(try guest.memory.read(count: 4, at: guest.eventBuffers[head]!) == [0, 0, 0, 0], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET")
        #expect(try restored.servedQueues?[2]?.nextUsed == 1)

        // The guest's old connection is unknown to the new device: its packets are answered with a reset.
        guest.device = restored
        try guest.send(.readWrite, payload: [1])
        #expect(try guest.receive()?.header.op == .reset)
        // Connecting again works.
        close(try guest.connect())
    }
}

/// A hostile guest: the device's queues, connections and descriptors stay bounded.
@Suite(.serialized) struct VirtioVsockBoundsTests {
    @Test func theControlQueueStaysBoundedWhileTheGuestGivesNoReceiveBuffers() throws {
        var guest = try VsockGuest(receiveBuffers: 0)
        defer { guest.device.stop() }
        let cap = VirtioVsock.maximumControlPackets
        // Packets for connections that do not exist: each asks for a RST the guest has no buffer for.
        for i in 0..<cap + 10 { try guest.send(.readWrite, from: UInt32(6000 + i)) }
        #expect(guest.device.pendingControlPackets == cap)
        // The packets past the cap wait in the guest's own transmit queue.
        #expect(try guest.tx.usedIndex == UInt16(cap))
        // Receive buffers drain the queue, and the packets left are taken then.
        var resets = 0
        for _ in 0..<20 where resets < cap + 10 {
            try guest.postReceiveBuffers(16)
            let headers = try guest.receiveAvailable()
            #expect(headers.allSatisfy { $0.op == .reset })
            resets += headers.count
        }
        #expect(resets == cap + 10)
        #expect(try guest.tx.usedIndex == UInt16(cap + 10))
        #expect(guest.device.pendingControlPackets == 0)
    }

    @Test func aCreditUpdateTheFullControlQueueDroppedIsSentOnceItDrains() throws {
        // One receive buffer: the connection's RESPONSE takes it, and then the guest gives none.
        var guest = try VsockGuest(receiveBuffers: 1)
        defer { guest.device.stop() }
        guest.ports.startFull.store(true, ordering: .relaxed)
        let host = try guest.connect()
        defer { close(host) }
        // 160 KiB of guest data wait in the device (the host socket is full): past half the
        // device's buffer, but none reached the host, so no credit update is due yet.
        let chunk = [UInt8](repeating: 7, count: 4096)
        let sent = 40 * chunk.count
        for _ in 0..<40 { try guest.send(.readWrite, payload: chunk) }
        // Fill the control queue with RSTs (packets for connections that do not exist).
        let cap = VirtioVsock.maximumControlPackets
        for i in 0..<cap { try guest.send(.readWrite, from: UInt32(6000 + i)) }
        #expect(guest.device.pendingControlPackets == cap)
        // The host reads: the data reaches it, and the credit update that is now due finds the
        // control queue full.
        let filler = guest.ports.prefilled.load(ordering: .relaxed)
        #expect(readAll(host, count: filler + sent).count == filler + sent)
        #expect(guest.device.pendingControlPackets == cap)
        // Receive buffers drain the RSTs, and the update follows with everything forwarded.
        var update: VsockHeader?
        for _ in 0..<40 where update == nil {
            try guest.postReceiveBuffers(16)
            update = try guest.receiveAvailable().first { $0.op == .creditUpdate }
        }
        let header = try #require(update, "the guest hears how much of its data reached the host")
        #expect(header.destinationPort == 5000 && header.forwardCount == UInt32(sent))
    }

    @Test func connectionsPastTheLimitAreResetAndHostDescriptorsStayBounded() throws {
        var guest = try VsockGuest(receiveBuffers: 0)
        let before = openDescriptorCount()
        let limit = VirtioVsock.maximumConnections
        // The device holds one host descriptor per connection (the test's ports one more): a
        // guest must not be able to take a process's usual 1024.
        let budget = 256
        #expect(limit <= budget)
        var responses = 0, resets = 0
        for round in 0..<20 {
            for i in 0..<16 { try guest.send(.request, from: UInt32(10_000 + round * 16 + i)) }
            try guest.postReceiveBuffers(16)
            for header in try guest.receiveAvailable() {
                if header.op == .response { responses += 1 } else if header.op == .reset { resets += 1 }
            }
        }
        #expect(responses == limit)
        #expect(resets == 320 - limit)
        #expect(guest.device.connectionCount == limit)
        // Slack for descriptors that tests running beside this one open.
        #expect(openDescriptorCount() - before <= 2 * budget + 32)
        guest.device.stop()
        for fd in guest.ports.accepted.withLock({ $0 }) { close(fd) }
        #expect(openDescriptorCount() - before <= 32)
    }

    @Test func aConnectionTheGuestNeverAcceptsIsDropped() throws {
        var guest = try VsockGuest(requestTimeoutMilliseconds: 50)
        defer { guest.device.stop() }
        let host = try guest.device.connect(toGuestPort: 80)
        #expect(try guest.receive()?.header.op == .request)
        // The guest never answers: the host's end reads end of file, the guest gets a RST.
        try #require(try Poll.waitReadable(host.rawValue, timeoutMilliseconds: 10_000))
        #expect(readAll(host.rawValue, count: 1).isEmpty)
        let reset = try #require(try guest.receive())
        #expect(reset.header.op == .reset && reset.header.destinationPort == 80)
        #expect(guest.device.connectionCount == 0)
        // An answer after that is refused.
        try guest.send(.response, from: 80, to: reset.header.sourcePort)
        #expect(try guest.receive()?.header.op == .reset)
    }

    @Test func afterRequestStopNothingIsServed() throws {
        var guest = try VsockGuest()
        defer { guest.device.stop() }
        guest.device.requestStop()
        try guest.send(.request)
        #expect(try guest.tx.usedIndex == 0)
        #expect(guest.ports.accepted.withLock { $0 }.isEmpty)
    }
}

/// How many descriptors this process has open.
func openDescriptorCount() -> Int {
    OwnedFileDescriptor.directoryEntries("/proc/self/fd")?.count ?? 0
}
