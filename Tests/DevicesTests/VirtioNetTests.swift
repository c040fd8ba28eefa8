import Glibc
import GuestMemory
import Synchronization
import SwiftletNet
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

/// A filter scripted by the test: what it says about each frame, and the frames it saw.
final class ScriptedFilter: FrameFilter {
    let outboundRule: @Sendable ([UInt8]) -> FilterVerdict
    let inboundRule: @Sendable ([UInt8]) -> FilterVerdict
    let seen = Mutex<(outbound: [[UInt8]], inbound: [[UInt8]])>(([], []))

    init(outbound: @escaping @Sendable ([UInt8]) -> FilterVerdict = { _ in .pass },
         inbound: @escaping @Sendable ([UInt8]) -> FilterVerdict = { _ in .pass }) {
        outboundRule = outbound
        inboundRule = inbound
    }

    func outbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
        let bytes = Array(frame)
        seen.withLock { $0.outbound.append(bytes) }
        return outboundRule(bytes)
    }

    func inbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
        let bytes = Array(frame)
        seen.withLock { $0.inbound.append(bytes) }
        return inboundRule(bytes)
    }
}

/// The guest's side of a virtio-net device, laid out as Linux's virtio_net does it (receive
/// buffers of one descriptor with MRG_RXBUF, header and data in separate descriptors or one for
/// transmission), with a socket pair in place of passt: the test holds passt's end.
final class NetGuest {
    static let mac = try! MACAddress([0x02, 0x53, 0x57, 0x00, 0x00, 0x01])
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 64 << 20)])
    var rx: VirtqueueDriver
    var tx: VirtqueueDriver
    var device: VirtioNet
    /// passt's end of the socket pair.
    let peer: Int32
    let line = CountingLine()
    let warnings = WarningLog()
    /// Receive buffers by chain head.
    var receiveBuffers: [UInt16: [(address: GuestAddress, length: UInt32)]] = [:]
    var consumed: UInt16 = 0

    init(mtu: UInt16 = VirtioNet.defaultMTU, features: UInt64? = nil, filter: (any FrameFilter)? = nil,
         receiveBuffers: Int = 0, bufferSize: UInt32 = 2048) throws {
        rx = VirtqueueDriver(memory: memory, size: 256, base: GuestAddress(0x100000))
        tx = VirtqueueDriver(memory: memory, size: 256, base: GuestAddress(0x2000000))
        let pair = try UnixSocket.pair()
        peer = pair.second.release()
        let warnings = self.warnings
        device = try VirtioNet(mac: Self.mac, mtu: mtu, backend: pair.first, filter: filter,
                               onError: { e in warnings.withLock { $0.append(e.description) } })
        let features = features ?? device.offeredFeatures
        let eventIndex = features & VirtioFeature.eventIndex != 0
        try device.activate(VirtioActivation(memory: memory, queues: [rx.queue(eventIndex: eventIndex), tx.queue(eventIndex: eventIndex)],
                                             features: features, interrupt: VirtioInterrupt(line: line)))
        if receiveBuffers > 0 { try postReceiveBuffers(receiveBuffers, size: bufferSize) }
    }

    deinit {
        device.stop()
        close(peer)
    }

    /// Posts `count` receive chains of `size` bytes (one descriptor, or `split`: a 12-byte header
    /// descriptor and the rest) and notifies the receive queue.
    func postReceiveBuffers(_ count: Int, size: UInt32, split: Bool = false) throws {
        for _ in 0..<count {
            var parts: [(GuestAddress, UInt32, Bool)]
            if split {
                parts = [(try rx.buffer(12), 12, true), (try rx.buffer(Int(size) - 12), size - 12, true)]
            } else {
                parts = [(try rx.buffer(Int(size)), size, true)]
            }
            let head = try rx.chain(parts)
            receiveBuffers[head] = parts.map { ($0.0, $0.1) }
            try rx.publish(head)
        }
        device.queueNotified(0)
    }

    /// Sends a frame behind a virtio-net header (all zero unless given), in one descriptor or
    /// (`split`) a header descriptor and a frame descriptor, and notifies the transmit queue.
    func send(_ frame: [UInt8], header: [UInt8] = [UInt8](repeating: 0, count: 12), split: Bool = false, notify: Bool = true) throws {
        let parts: [(GuestAddress, UInt32, Bool)]
        if split {
            parts = [(try tx.buffer(header.count, bytes: header), UInt32(header.count), false),
                     (try tx.buffer(frame.count, bytes: frame), UInt32(frame.count), false)]
        } else {
            let bytes = header + frame
            parts = [(try tx.buffer(bytes.count, bytes: bytes), UInt32(bytes.count), false)]
        }
        try tx.publish(try tx.chain(parts))
        if notify { device.queueNotified(1) }
    }

    /// Publishes a transmit chain as given and notifies.
    func publish(_ parts: [(GuestAddress, UInt32, Bool)]) throws {
        try tx.publish(try tx.chain(parts))
        device.queueNotified(1)
    }

    /// The next frame on passt's end: its length prefix and the frame; nil if none came in 2 s.
    func readFromPeer(timeoutMilliseconds: Int = 2000) throws -> [UInt8]? {
        guard let prefix = try readExactly(4, timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        let length = Int(prefix[0]) << 24 | Int(prefix[1]) << 16 | Int(prefix[2]) << 8 | Int(prefix[3])
        return try readExactly(length, timeoutMilliseconds: timeoutMilliseconds)
    }

    func readExactly(_ count: Int, timeoutMilliseconds: Int) throws -> [UInt8]? {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: max(count, 1))
        while bytes.count < count {
            guard try Poll.waitReadable(peer, timeoutMilliseconds: timeoutMilliseconds) else { return nil }
            let n = chunk.withUnsafeMutableBytes { Glibc.read(peer, $0.baseAddress, count - bytes.count) }
            if n <= 0 { return nil }
            bytes += chunk[0..<n]
        }
        return bytes
    }

    /// Writes frames on passt's end, each behind its 4-byte big-endian length.
    func writeToPeer(_ frames: [UInt8]...) {
        var bytes: [UInt8] = []
        for frame in frames { bytes += Self.prefix(frame.count) + frame }
        writeAll(peer, bytes)
    }

    static func prefix(_ length: Int) -> [UInt8] {
        [UInt8(truncatingIfNeeded: length >> 24), UInt8(truncatingIfNeeded: length >> 16), UInt8(truncatingIfNeeded: length >> 8), UInt8(truncatingIfNeeded: length)]
    }

    /// A frame the device wrote into the receive queue: its header, the frame, and the used
    /// length of each chain it took. Waits up to 2 s for the device's thread.
    struct Received {
        var header: [UInt8]
        var frame: [UInt8]
        var lengths: [UInt32]
        var numBuffers: Int { Int(header[10]) | Int(header[11]) << 8 }
    }

    func receive(timeoutMilliseconds: Int = 2000) throws -> Received? {
        guard let (first, length) = try nextUsed(timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        var bytes = try chainBytes(first, length)
        var lengths = [length]
        guard bytes.count >= 12 else { return Received(header: bytes, frame: [], lengths: lengths) }
        let count = Int(bytes[10]) | Int(bytes[11]) << 8
        for _ in 1..<max(count, 1) {
            guard let (head, length) = try nextUsed(timeoutMilliseconds: timeoutMilliseconds) else { break }
            bytes += try chainBytes(head, length)
            lengths.append(length)
        }
        return Received(header: Array(bytes[0..<12]), frame: Array(bytes[12...]), lengths: lengths)
    }

    /// The next used receive element, waiting for it.
    func nextUsed(timeoutMilliseconds: Int = 2000) throws -> (UInt16, UInt32)? {
        for _ in 0..<max(1, timeoutMilliseconds / 5) {
            if try rx.usedIndex != consumed {
                let element = try rx.used(consumed)
                consumed &+= 1
                return element
            }
            usleep(5000)
        }
        return nil
    }

    func chainBytes(_ head: UInt16, _ length: UInt32) throws -> [UInt8] {
        var bytes: [UInt8] = [], left = Int(length)
        for (address, size) in receiveBuffers[head] ?? [] where left > 0 {
            let n = min(left, Int(size))
            bytes += try memory.read(count: n, at: address)
            left -= n
        }
        return bytes
    }

    var errors: [String] { warnings.withLock { $0 } }
}

/// A guest a filter's closure may reach (it runs on the thread that serves the frame).
final class GuestBox: @unchecked Sendable {
    // SAFETY (Sendable): `guest` is set by the test before the device serves anything and
    // cleared after it stopped; the filter only reads it.
    var guest: NetGuest?
    let count = Atomic<Int>(0)
    var frames: Int { count.load(ordering: .relaxed) }
    func next() -> Int { count.add(1, ordering: .relaxed).newValue }
}

/// An Ethernet frame: destination, source, EtherType, then `payload`.
func ethernetFrame(_ payload: [UInt8], etherType: UInt16 = 0x0800) -> [UInt8] {
    [0x02, 0x53, 0x57, 0x00, 0x00, 0x02] + NetGuest.mac.bytes + [UInt8(etherType >> 8), UInt8(etherType & 0xFF)] + payload
}

/// A frame of `length` bytes whose payload counts up from `seed`.
func numberedFrame(_ length: Int, seed: Int = 0) -> [UInt8] {
    ethernetFrame((0..<(length - 14)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ seed) })
}

/// The Internet checksum computed the plain way (RFC 1071: big-endian 16-bit words, a last odd
/// byte padded with zero, folded, complemented), independent of the device's.
func referenceChecksum(_ bytes: [UInt8]) -> UInt16 {
    var sum: UInt32 = 0
    var i = 0
    while i < bytes.count {
        sum += UInt32(bytes[i]) << 8 | (i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0)
        i += 2
    }
    while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
    return ~UInt16(sum)
}

/// An IPv4 frame from 10.0.2.15 to 93.184.216.34 carrying `segment` as protocol `proto`.
func ipv4Frame(proto: UInt8, segment: [UInt8]) -> [UInt8] {
    let total = 20 + segment.count
    var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 1, 0x40, 0, 64, proto, 0, 0,
                       10, 0, 2, 15, 93, 184, 216, 34]
    let check = referenceChecksum(ip)
    ip[10] = UInt8(check >> 8); ip[11] = UInt8(check & 0xFF)
    return ethernetFrame(ip + segment)
}

/// The pseudo-header of that IPv4 frame for a segment of `length` bytes.
func pseudoHeader(proto: UInt8, length: Int) -> [UInt8] {
    [10, 0, 2, 15, 93, 184, 216, 34, 0, proto, UInt8(length >> 8), UInt8(length & 0xFF)]
}

@Suite(.serialized) struct VirtioNetTests {
    @Test func advertisesItsMACLinkAndMTU() throws {
        let guest = try NetGuest(mtu: 9000)
        var config = [UInt8](repeating: 0xEE, count: 16)
        config.withUnsafeMutableBytes { guest.device.readConfiguration(offset: 0, into: $0) }
        #expect(Array(config[0..<6]) == NetGuest.mac.bytes)
        #expect(config[6] == 1 && config[7] == 0, "VIRTIO_NET_S_LINK_UP")
        #expect(config[10] == UInt8(9000 & 0xFF) && config[11] == UInt8(9000 >> 8))
        #expect(config[12...].allSatisfy { $0 == 0 })
        // A read at an offset (Linux reads the MTU alone, 2 bytes at 10).
        var mtu = [UInt8](repeating: 0, count: 2)
        mtu.withUnsafeMutableBytes { guest.device.readConfiguration(offset: 10, into: $0) }
        #expect(mtu == [UInt8(9000 & 0xFF), UInt8(9000 >> 8)])
        let features = guest.device.offeredFeatures
        for bit in [0, 1, 3, 5, 15, 16, 29, 32] { #expect(features & (1 << UInt64(bit)) != 0, "feature bit \(bit)") }
        #expect(features & (1 << 17) == 0, "no control queue")
        #expect(guest.device.queueMaximumSizes.count == 2)
        #expect(throws: SwiftletError.self) {
            let pair = try UnixSocket.pair()
            _ = try VirtioNet(mac: NetGuest.mac, mtu: 67, backend: pair.first, filter: nil)
        }
    }

    @Test func aTransmittedFrameArrivesOnTheSocketBehindItsLength() throws {
        let guest = try NetGuest()
        let frame = numberedFrame(1514)
        try guest.send(frame)
        #expect(try guest.readFromPeer() == frame)
        // Header and frame in separate descriptors, as a driver without VERSION_1's push does it.
        let second = numberedFrame(60, seed: 3)
        try guest.send(second, split: true)
        #expect(try guest.readFromPeer() == second)
        #expect(try guest.tx.usedIndex == 2)
        #expect(try guest.tx.used(0).length == 0, "the device writes nothing into transmit buffers")
        #expect(guest.line.raised.load(ordering: .relaxed) >= 1)
        #expect(guest.device.statistics.transmittedFrames == 2)
        // The largest frame the MTU allows goes whole.
        let largest = numberedFrame(Int(VirtioNet.defaultMTU) + 14, seed: 5)
        try guest.send(largest)
        #expect(try guest.readFromPeer() == largest)
    }

    @Test func receivedFramesSpanMergeableBuffers() throws {
        let guest = try NetGuest(receiveBuffers: 8, bufferSize: 1536)
        let frame = numberedFrame(4000)
        guest.writeToPeer(frame)
        let received = try #require(try guest.receive())
        #expect(received.numBuffers == 3)
        #expect(received.lengths == [1536, 1536, UInt32(4012 - 3072)])
        #expect(received.header[0] == 2, "DATA_VALID with GUEST_CSUM")
        #expect(received.header[1...9].allSatisfy { $0 == 0 })
        #expect(received.frame == frame)
        // A small frame takes one buffer.
        let small = numberedFrame(60, seed: 9)
        guest.writeToPeer(small)
        let next = try #require(try guest.receive())
        #expect(next.numBuffers == 1 && next.lengths == [72] && next.frame == small)
        #expect(guest.device.statistics.receivedFrames == 2)
        #expect(guest.line.raised.load(ordering: .relaxed) >= 1)
    }

    @Test func aLargeFrameOverManySmallBuffersWaitsForEnoughOfThem() throws {
        // 300-byte buffers: a 65534-byte frame needs 219 of them; the guest posts them in parts.
        let guest = try NetGuest(receiveBuffers: 100, bufferSize: 300)
        let frame = numberedFrame(Int(VirtioNet.defaultMTU) + 14)
        guest.writeToPeer(frame)
        usleep(50_000)
        #expect(try guest.rx.usedIndex == 0, "nothing is written before the whole frame has room")
        try guest.postReceiveBuffers(150, size: 300)
        let received = try #require(try guest.receive())
        #expect(received.numBuffers == (frame.count + 12 + 299) / 300)
        #expect(received.frame == frame)
    }

    @Test func withoutMergeableBuffersEachFrameTakesOneChain() throws {
        let features = VirtioFeature.version1 | VirtioNetFeature.mac | VirtioNetFeature.mtu
        let guest = try NetGuest(mtu: 1500, features: features)
        try guest.postReceiveBuffers(4, size: 1526, split: true)
        let frame = numberedFrame(1514)
        guest.writeToPeer(frame)
        let received = try #require(try guest.receive())
        #expect(received.numBuffers == 1, "num_buffers is 1 without MRG_RXBUF (the header is 12 bytes with VERSION_1)")
        #expect(received.header[0] == 0, "no DATA_VALID without GUEST_CSUM")
        #expect(received.lengths == [1526])
        #expect(received.frame == frame)
        // Chains smaller than the frame: the frame is dropped, the chain kept for the next one.
        let small = try NetGuest(features: features)
        try small.postReceiveBuffers(1, size: 1526, split: true)
        small.writeToPeer(numberedFrame(3000), numberedFrame(100, seed: 1))
        let next = try #require(try small.receive())
        #expect(next.frame == numberedFrame(100, seed: 1))
        #expect(small.device.statistics.droppedNoRoom == 1)
        #expect(small.errors.contains { $0.contains("does not fit the guest's receive buffers") })
    }

    @Test func partialChecksumsAreCompletedBeforeTheFrameLeaves() throws {
        let guest = try NetGuest()
        // TCP: the driver leaves the pseudo-header's sum in the checksum field (Linux's CHECKSUM_PARTIAL).
        var tcp = [UInt8](repeating: 0, count: 20) + Array("a payload of odd length".utf8)
        tcp[0] = 0x9C; tcp[1] = 0x40; tcp[2] = 0; tcp[3] = 80; tcp[12] = 0x50; tcp[13] = 0x18
        let pseudo = pseudoHeader(proto: 6, length: tcp.count)
        let partial = ~referenceChecksum(pseudo)
        tcp[16] = UInt8(partial >> 8); tcp[17] = UInt8(partial & 0xFF)
        let frame = ipv4Frame(proto: 6, segment: tcp)
        var header = [UInt8](repeating: 0, count: 12)
        header[0] = 1 // NEEDS_CSUM
        header[6] = 34; header[8] = 16 // csum_start: Ethernet + IPv4 headers; csum_offset: TCP's field
        try guest.send(frame, header: header)
        let sent = try #require(try guest.readFromPeer())
        let segment = Array(sent[34...])
        #expect(referenceChecksum(pseudo + segment) == 0, "the checksum verifies")
        var zeroed = tcp; zeroed[16] = 0; zeroed[17] = 0
        let expected = referenceChecksum(pseudo + zeroed)
        #expect(UInt16(segment[16]) << 8 | UInt16(segment[17]) == expected)
        #expect(Array(sent[0..<34]) == Array(frame[0..<34]) && Array(segment[18...]) == Array(tcp[18...]), "nothing else changed")

        // UDP (field at offset 6), header in its own descriptor.
        var udp: [UInt8] = [0x9C, 0x41, 0, 53, 0, 0, 0, 0] + Array("question".utf8)
        udp[5] = UInt8(udp.count)
        let udpPseudo = pseudoHeader(proto: 17, length: udp.count)
        let udpPartial = ~referenceChecksum(udpPseudo)
        udp[6] = UInt8(udpPartial >> 8); udp[7] = UInt8(udpPartial & 0xFF)
        header[8] = 6
        try guest.send(ipv4Frame(proto: 17, segment: udp), header: header, split: true)
        let udpSent = try #require(try guest.readFromPeer())
        #expect(referenceChecksum(udpPseudo + Array(udpSent[34...])) == 0)
        #expect(guest.device.statistics.checksumsCompleted == 2)

        // A checksum field outside the frame: dropped (never written past the frame), the next one passes.
        header[6] = UInt8(frame.count & 0xFF); header[7] = UInt8(frame.count >> 8); header[8] = 0
        try guest.send(frame, header: header)
        header[6] = 34; header[7] = 0; header[8] = UInt8(frame.count - 34 - 1) // the field's second byte past the end
        try guest.send(frame, header: header)
        try guest.send(numberedFrame(64))
        #expect(try guest.readFromPeer() == numberedFrame(64))
        #expect(guest.device.statistics.droppedMalformed == 2)
        #expect(guest.errors.contains { $0.contains("partial checksum") && $0.contains("outside its frame") })
    }

    @Test func theChecksumMatchesTheReferenceForEveryLengthAndAlignment() {
        var bytes = (0..<300).map { UInt8(truncatingIfNeeded: $0 &* 151 &+ 17) }
        for length in 0..<80 {
            for start in 0..<9 where start + length <= bytes.count {
                let slice = Array(bytes[start..<start + length])
                let folded = bytes.withUnsafeBytes { PartialChecksum.foldedSum(UnsafeRawBufferPointer(rebasing: $0[start..<start + length])) }
                // The device's sum is in memory order: its bytes, stored natively, are the network-order sum.
                let network = withUnsafeBytes(of: folded) { UInt16($0[0]) << 8 | UInt16($0[1]) }
                #expect(~network == referenceChecksum(slice), "length \(length) at offset \(start)")
            }
        }
        // A sum of 0xFFFF (data 0x1234, partial sum 0xEDCB in the field) complements to 0, which goes out as 0xFFFF.
        bytes = [0x12, 0x34, 0xED, 0xCB]
        let done = bytes.withUnsafeMutableBytes { PartialChecksum.complete($0, start: 0, offset: 2) }
        #expect(done && bytes == [0x12, 0x34, 0xFF, 0xFF])
        var short: [UInt8] = [1, 2, 3]
        #expect(!short.withUnsafeMutableBytes { PartialChecksum.complete($0, start: 2, offset: 0) })
        #expect(!short.withUnsafeMutableBytes { PartialChecksum.complete($0, start: 4, offset: 0) })
        #expect(short == [1, 2, 3])
    }

    @Test func theFilterPassesDropsAndAnswers() throws {
        let reply = ethernetFrame(Array("made on the host".utf8) + [UInt8](repeating: 0, count: 30), etherType: 0x0806)
        let filter = ScriptedFilter(outbound: { frame in
            switch UInt16(frame[12]) << 8 | UInt16(frame[13]) {
            case 0x86DD: return .drop
            case 0x0806: return .reply([reply])
            default: return .pass
            }
        }, inbound: { frame in frame[14] == 0xDD ? .drop : .pass })
        let guest = try NetGuest(filter: filter, receiveBuffers: 8)
        try guest.send(ethernetFrame([1, 2, 3], etherType: 0x86DD))
        try guest.send(ethernetFrame([4, 5, 6], etherType: 0x0806))
        try guest.send(ethernetFrame([7, 8, 9]))
        #expect(try guest.readFromPeer() == ethernetFrame([7, 8, 9]), "dropped and answered frames never reach the socket")
        let answered = try #require(try guest.receive())
        #expect(answered.frame == reply && answered.numBuffers == 1)
        #expect(filter.seen.withLock { $0.outbound.count } == 3)

        guest.writeToPeer(ethernetFrame([0xDD, 1]), ethernetFrame([0xAA, 2]))
        let inbound = try #require(try guest.receive())
        #expect(inbound.frame == ethernetFrame([0xAA, 2]), "the filtered inbound frame never reaches the guest")
        #expect(filter.seen.withLock { $0.inbound.count } == 2)
        #expect(guest.device.statistics.droppedByFilter == 3)
    }

    @Test func theFilterSeesEachInboundFrameOnceEvenWhenItWaitsForBuffers() throws {
        let filter = ScriptedFilter()
        let guest = try NetGuest(filter: filter)
        guest.writeToPeer(numberedFrame(100))
        usleep(50_000)
        try guest.postReceiveBuffers(1, size: 64) // too small alone: the frame waits for more
        for _ in 0..<200 where guest.device.heldCounts.receiveChains < 1 { usleep(5000) }
        #expect(guest.device.heldCounts.receiveChains == 1)
        // The device holds the chain (rather than giving it back): avail_event asks the driver
        // to notify for the next buffer, so posting one wakes the device.
        let availableEvent: UInt16 = try guest.memory.read(at: guest.rx.usedRing + 4 + 8 * UInt64(guest.rx.size))
        #expect(availableEvent == 1)
        try guest.postReceiveBuffers(2, size: 64)
        let received = try #require(try guest.receive())
        #expect(received.frame == numberedFrame(100) && received.numBuffers == 2)
        #expect(filter.seen.withLock { $0.inbound.count } == 1)
    }

    @Test func repliesStayBoundedWhileTheGuestPostsNoBuffers() throws {
        let reply = ethernetFrame([UInt8](repeating: 1, count: 50), etherType: 0x0806)
        let guest = try NetGuest(filter: ScriptedFilter(outbound: { _ in .reply([reply, reply]) }))
        for _ in 0..<VirtioNet.maximumPendingReplies { try guest.send(ethernetFrame([1])) }
        #expect(guest.device.heldCounts.replies == VirtioNet.maximumPendingReplies)
        #expect(guest.device.statistics.droppedNoRoom == VirtioNet.maximumPendingReplies)
        try guest.postReceiveBuffers(80, size: 2048)
        for _ in 0..<VirtioNet.maximumPendingReplies { #expect(try guest.receive()?.frame == reply) }
        #expect(guest.device.heldCounts.replies == 0)
    }

    @Test func brokenLengthPrefixesCloseTheBackend() throws {
        for (prefix, name) in [([0, 0, 0, 0] as [UInt8], "0"), ([0xFF, 0xFF, 0xFF, 0xFF], "4294967295"),
                               (NetGuest.prefix(VirtioNet.maximumStreamFrame + 1), "\(VirtioNet.maximumStreamFrame + 1)")] {
            let guest = try NetGuest(receiveBuffers: 4)
            writeAll(guest.peer, prefix + [UInt8](repeating: 0, count: 64))
            #expect(try guest.readExactly(1, timeoutMilliseconds: 2000) == nil, "the device closed the socket (length \(name))")
            #expect(guest.errors.contains { $0.contains("frame length of \(name) bytes") })
            #expect(guest.device.heldCounts.receiveBytes == 0)
            #expect(try guest.rx.usedIndex == 0)
        }
    }

    @Test func framesFromTheSocketOverTheMTUOrUnderAHeaderAreDropped() throws {
        let guest = try NetGuest(mtu: 1500, receiveBuffers: 8)
        guest.writeToPeer(numberedFrame(1515), [1, 2, 3], numberedFrame(1514, seed: 4))
        let received = try #require(try guest.receive())
        #expect(received.frame == numberedFrame(1514, seed: 4))
        #expect(guest.device.statistics.droppedOversized == 1 && guest.device.statistics.droppedMalformed == 1)
        #expect(guest.errors.isEmpty, "a large frame is not a broken stream: \(guest.errors)")
    }

    @Test func guestFramesOverTheMTUAreDroppedWithoutTrustingTheirLength() throws {
        let guest = try NetGuest(mtu: 1500)
        try guest.send(numberedFrame(1515))
        // A chain that claims 256 MiB: the same 1 MiB buffer 256 times.
        let big = try guest.tx.buffer(1 << 20)
        try guest.publish([(GuestAddress, UInt32, Bool)](repeating: (big, 1 << 20, false), count: 255))
        try guest.send(numberedFrame(1514))
        #expect(try guest.readFromPeer() == numberedFrame(1514))
        #expect(try guest.tx.usedIndex == 3)
        #expect(guest.device.statistics.droppedOversized == 2)
        #expect(guest.errors.contains { $0.contains("more than its MTU of 1500 allows") })
    }

    @Test func malformedChainsAreReturnedAndCounted() throws {
        let guest = try NetGuest()
        // Transmit: a device-writable buffer, a chain shorter than the header and an Ethernet header,
        // and segmentation offload the device never offered.
        let frame = numberedFrame(100)
        try guest.publish([(try guest.tx.buffer(112, bytes: [UInt8](repeating: 0, count: 12) + frame), 112, false),
                           (try guest.tx.buffer(16), 16, true)])
        try guest.publish([(try guest.tx.buffer(20), 20, false)])
        var gso = [UInt8](repeating: 0, count: 12); gso[1] = 1
        try guest.send(frame, header: gso)
        try guest.send(frame)
        #expect(try guest.readFromPeer() == frame)
        #expect(try guest.tx.usedIndex == 4)
        #expect(guest.device.statistics.droppedMalformed == 3)
        #expect(guest.errors.contains { $0.contains("device-writable") })

        // Receive: a read-only chain and one too short for the header go back empty; the next takes the frame.
        var head = try guest.rx.chain([(try guest.rx.buffer(16), 16, false), (try guest.rx.buffer(2048), 2048, true)])
        try guest.rx.publish(head)
        head = try guest.rx.chain([(try guest.rx.buffer(8), 8, true)])
        try guest.rx.publish(head)
        try guest.postReceiveBuffers(1, size: 2048)
        guest.writeToPeer(frame)
        let first = try #require(try guest.nextUsed())
        let second = try #require(try guest.nextUsed())
        #expect(first.1 == 0 && second.1 == 0)
        #expect(try guest.receive()?.frame == frame)
        #expect(guest.device.statistics.malformedReceiveChains == 2)
    }

    @Test func noReceiveBuffersHoldsTheSocketBackThenFramesFlowInOrder() throws {
        let guest = try NetGuest()
        _ = fcntl(guest.peer, F_SETFL, O_NONBLOCK)
        // passt writes until the socket takes no more: the device reads a bounded amount only.
        var sent = 0
        writing: while sent < 10_000 {
            let bytes = NetGuest.prefix(1000) + numberedFrame(1000, seed: sent)
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.write(guest.peer, $0.baseAddress! + done, $0.count - done) }
                if n < 0 {
                    if done == 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break writing }
                    usleep(1000) // finish the frame we started
                    continue
                }
                done += n
            }
            sent += 1
            if sent % 64 == 0 { usleep(2000) } // let the device's thread read what it will
        }
        #expect(sent < 10_000, "the socket fills: the device stopped reading")
        #expect(guest.device.heldCounts.receiveBytes <= VirtioNet.receiveBufferSize)
        _ = fcntl(guest.peer, F_SETFL, 0)
        var received = 0
        while received < sent {
            try guest.postReceiveBuffers(64, size: 2048)
            for _ in 0..<64 where received < sent {
                let frame = try #require(try guest.receive(), "frame \(received) of \(sent)")
                #expect(frame.frame == numberedFrame(1000, seed: received))
                received += 1
            }
        }
        #expect(guest.device.statistics.receivedFrames == sent)
    }

    @Test func aSocketThatDoesNotDrainStopsTheTransmitQueue() throws {
        let guest = try NetGuest()
        // passt reads nothing: the device takes chains while its buffer and the socket have room.
        let frame = numberedFrame(60_000)
        let address = try guest.tx.buffer(12 + frame.count, bytes: [UInt8](repeating: 0, count: 12) + frame)
        for _ in 0..<40 { try guest.publish([(address, UInt32(12 + frame.count), false)]) }
        let taken = try guest.tx.usedIndex
        #expect(taken < 40, "chains wait in the ring")
        #expect(guest.device.heldCounts.transmitBytes <= VirtioNet.transmitBufferSize)
        // passt reads: the device's thread takes the rest without another notification.
        for i in 0..<40 { #expect(try guest.readFromPeer() == frame, "frame \(i)") }
        #expect(try guest.tx.usedIndex == 40)
    }

    @Test func aClosedBackendDropsFramesAndIsReportedOnce() throws {
        let guest = try NetGuest(receiveBuffers: 4)
        shutdown(guest.peer, Int32(SHUT_RDWR))
        for _ in 0..<200 where guest.errors.isEmpty { usleep(5000) }
        #expect(guest.errors.count == 1)
        #expect(guest.errors.first?.contains("closed its connection") == true)
        for _ in 0..<3 { try guest.send(numberedFrame(100)) }
        #expect(try guest.tx.usedIndex == 3, "the link stays up: frames are taken and dropped")
        #expect(guest.device.statistics.droppedBackendClosed == 3)
        #expect(guest.errors.count == 1)
    }

    /// A guest that queues a frame for every frame sent keeps the vCPU thread in the transmit
    /// loop: requestStop ends it at the next frame.
    @Test func requestStopEndsABusyTransmitLoop() throws {
        let box = GuestBox()
        let filter = ScriptedFilter(outbound: { _ in
            guard let guest = box.guest else { return .pass }
            let n = box.next()
            if n == 100 { guest.device.requestStop() }
            if n < 1000 { try? guest.send(numberedFrame(60), notify: false) }
            return .drop
        })
        let guest = try NetGuest(filter: filter)
        box.guest = guest
        defer { box.guest = nil }
        try guest.send(numberedFrame(60))
        #expect(box.frames == 100, "the loop ended at the frame after requestStop")
        try guest.send(numberedFrame(60))
        #expect(box.frames == 100, "nothing is served after requestStop")
        guest.device.stop()
    }

    /// A socket that always has frames and a guest that always has buffers keep the device's
    /// thread busy: requestStop ends it at the next frame.
    @Test func requestStopEndsABusyReceiveLoop() throws {
        let box = GuestBox()
        let filter = ScriptedFilter(inbound: { _ in
            if box.next() == 50 { box.guest?.device.requestStop() }
            return .pass
        })
        let guest = try NetGuest(filter: filter, receiveBuffers: 200)
        box.guest = guest
        defer { box.guest = nil }
        var frames: [[UInt8]] = []
        for i in 0..<150 { frames.append(numberedFrame(500, seed: i)) }
        writeAll(guest.peer, frames.flatMap { NetGuest.prefix($0.count) + $0 })
        for _ in 0..<200 where box.frames < 50 { usleep(5000) }
        usleep(50_000)
        #expect(box.frames == 50, "the loop ended at the frame after requestStop")
        #expect(try guest.rx.usedIndex <= 50)
        try guest.postReceiveBuffers(50, size: 2048)
        usleep(20_000)
        #expect(box.frames == 50, "nothing is served after requestStop")
        guest.device.stop() // returns: the thread ended
    }

    @Test func resetForgetsTheQueues() throws {
        let guest = try NetGuest(receiveBuffers: 4)
        guest.device.reset()
        #expect(guest.device.servedQueues?.allSatisfy { $0 == nil } == true)
        try guest.send(numberedFrame(100))
        #expect(try guest.tx.usedIndex == 0)
    }
}

/// What a snapshot keeps (the queues' positions) and that a paused device leaves the guest alone.
@Suite(.serialized) struct VirtioNetSnapshotTests {
    @Test func aQuiescedDeviceLeavesGuestMemoryAloneAndCatchesUpAfterwards() throws {
        let guest = try NetGuest(receiveBuffers: 4)
        guest.device.setQuiesced(true)
        let raised = guest.line.raised.load(ordering: .relaxed)
        guest.writeToPeer(numberedFrame(500))
        usleep(100_000)
        guest.device.service() // a turn of the device's thread, woken for whatever reason
        #expect(try guest.rx.usedIndex == 0)
        #expect(guest.line.raised.load(ordering: .relaxed) == raised)
        guest.device.setQuiesced(false)
        #expect(try guest.receive()?.frame == numberedFrame(500))
    }

    @Test func servedQueuesCountOnlyChainsReturnedToTheDriver() throws {
        let guest = try NetGuest(receiveBuffers: 2, bufferSize: 300)
        try guest.send(numberedFrame(100))
        _ = try guest.readFromPeer()
        // A frame that needs four buffers of the two posted: the device holds two and waits.
        guest.writeToPeer(numberedFrame(1000))
        for _ in 0..<200 where guest.device.heldCounts.receiveChains < 2 { usleep(5000) }
        #expect(guest.device.heldCounts.receiveChains == 2)
        guest.device.setQuiesced(true)
        let saved = try #require(guest.device.servedQueues)
        #expect(saved.count == 2)
        let rx = try #require(saved[0]), tx = try #require(saved[1])
        #expect(rx.nextAvailable == 0 && rx.nextUsed == 0, "held chains went back to the ring")
        #expect(tx.nextAvailable == 1 && tx.nextUsed == 1)

        // A restored device goes on from there (the frame in flight is gone with the old one).
        guest.device.stop()
        let pair = try UnixSocket.pair()
        let restored = try VirtioNet(mac: NetGuest.mac, backend: pair.first, filter: nil)
        defer { restored.stop() }
        try restored.activate(VirtioActivation(memory: guest.memory, queues: saved.map { $0! }, features: restored.offeredFeatures,
                                               interrupt: VirtioInterrupt(line: CountingLine())))
        restored.didRestore()
        let peer = pair.second
        writeAll(peer.rawValue, NetGuest.prefix(200) + numberedFrame(200))
        guest.device = restored
        let received = try #require(try guest.receive())
        #expect(received.frame == numberedFrame(200) && received.numBuffers == 1)
    }
}

/// The device behind the virtio-mmio transport, brought up the way Linux's driver does it, with
/// a driver that takes only some of the features.
@Suite struct VirtioNetTransportTests {
    typealias R = VirtioMMIOTransport.Register

    func write(_ t: VirtioMMIOTransport, _ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { t.write(offset: offset, data: $0) }
    }

    func read(_ t: VirtioMMIOTransport, _ offset: UInt64, count: Int = 4) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { t.read(offset: offset, into: $0) }
        return bytes
    }

    @Test func aDriverWithFewerFeaturesGetsOneChainPerFrameAndTheTransportSavesTheQueues() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 16 << 20)])
        let pair = try UnixSocket.pair()
        let peer = pair.second
        let device = try VirtioNet(mac: NetGuest.mac, backend: pair.first, filter: nil)
        defer { device.stop() }
        let transport = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: CountingLine()))
        #expect(read(transport, R.deviceID) == [1, 0, 0, 0])
        #expect((0..<6).map { read(transport, R.configuration + UInt64($0), count: 1)[0] } == NetGuest.mac.bytes)

        var rx = VirtqueueDriver(memory: memory, size: 64, base: GuestAddress(0x100000))
        let tx = VirtqueueDriver(memory: memory, size: 64, base: GuestAddress(0x800000))
        let features = VirtioFeature.version1 | VirtioNetFeature.mac
        let ok = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK
        write(transport, R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        write(transport, R.driverFeaturesSelect, 0)
        write(transport, R.driverFeatures, UInt32(truncatingIfNeeded: features))
        write(transport, R.driverFeaturesSelect, 1)
        write(transport, R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        write(transport, R.status, ok)
        #expect(transport.status & VirtioStatus.featuresOK != 0)
        for (index, driver) in [rx, tx].enumerated() {
            write(transport, R.queueSelect, UInt32(index))
            write(transport, R.queueSize, UInt32(driver.size))
            write(transport, R.queueDescriptorLow, UInt32(driver.descriptorTable.rawValue))
            write(transport, R.queueDriverLow, UInt32(driver.availableRing.rawValue))
            write(transport, R.queueDeviceLow, UInt32(driver.usedRing.rawValue))
            write(transport, R.queueReady, 1)
        }
        write(transport, R.status, ok | VirtioStatus.driverOK)

        // Linux's small receive buffers without MRG_RXBUF: header and 1518 bytes in one descriptor.
        var buffers: [UInt16: GuestAddress] = [:]
        for _ in 0..<4 {
            let buffer = try rx.buffer(1530)
            let head = try rx.chain([(buffer, 1530, true)])
            buffers[head] = buffer
            try rx.publish(head)
        }
        write(transport, R.queueNotify, 0)
        let frame = numberedFrame(1514)
        writeAll(peer.rawValue, NetGuest.prefix(frame.count) + frame)
        for _ in 0..<400 where try rx.usedIndex == 0 { usleep(5000) }
        let (head, length) = try rx.used(0)
        #expect(length == 1526)
        let bytes = try memory.read(count: Int(length), at: buffers[head]!)
        #expect(bytes[0] == 0 && bytes[10] == 1 && bytes[11] == 0, "no DATA_VALID, num_buffers 1")
        #expect(Array(bytes[12...]) == frame)

        device.setQuiesced(true)
        #expect(transport.canSaveState)
        let state = try transport.saveState()
        #expect(state.queues[0].nextUsed == 1 && state.queues[0].eventIndex == false)
        device.setQuiesced(false)
    }
}

/// The device with SwiftletNet's `EgressFilter` between it and passt, as a machine has them:
/// what the policy refuses never reaches the socket, and its answers reach the guest.
@Suite struct VirtioNetEgressFilterTests {
    /// A UDP datagram from the guest (10.0.2.15) to `destination` (four bytes) in an Ethernet frame.
    static func udpFrame(to destination: [UInt8], port: UInt16, payload: [UInt8]) -> [UInt8] {
        let length = 8 + payload.count
        var udp: [UInt8] = [0x82, 0x35, UInt8(port >> 8), UInt8(port & 0xFF), UInt8(length >> 8), UInt8(length & 0xFF), 0, 0] + payload
        let pseudo: [UInt8] = [10, 0, 2, 15] + destination + [0, 17, UInt8(length >> 8), UInt8(length & 0xFF)]
        let sum = referenceChecksum(pseudo + udp)
        udp[6] = UInt8(sum >> 8); udp[7] = UInt8(sum & 0xFF)
        let total = 20 + udp.count
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 2, 15] + destination
        let check = referenceChecksum(ip)
        ip[10] = UInt8(check >> 8); ip[11] = UInt8(check & 0xFF)
        return [0x02, 0x53, 0x57, 0, 0, 0x02] + NetGuest.mac.bytes + [0x08, 0x00] + ip + udp
    }

    /// A DNS query for an A record of `name`.
    static func query(_ name: String, id: UInt16) -> [UInt8] {
        var message: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") { message += [UInt8(label.utf8.count)] + Array(label.utf8) }
        return message + [0, 0, 1, 0, 1]
    }

    @Test func aQueryForANameNotAllowedIsAnsweredOnTheHostAndNeverReachesPasst() throws {
        let configuration = NetworkConfiguration(allowedHosts: [try HostPattern(parsing: "example.com")])
        let filter = EgressFilter(configuration: configuration, log: { _ in })
        let guest = try NetGuest(filter: filter, receiveBuffers: 8)
        let dns: [UInt8] = [10, 0, 2, 3]
        try guest.send(Self.udpFrame(to: dns, port: 53, payload: Self.query("blocked.test", id: 0x4242)))
        let answer = try #require(try guest.receive())
        // Ethernet, IPv4 (20), UDP (8), then DNS: the query's id, a response with NXDOMAIN (rcode 3).
        let message = Array(answer.frame[42...])
        #expect(message[0] == 0x42 && message[1] == 0x42)
        #expect(message[2] & 0x80 != 0 && message[3] & 0x0F == 3)
        #expect(Array(answer.frame[26..<30]) == dns, "from the DNS address")
        // An allowed name goes to passt: the first frame on the socket is that query.
        let allowed = Self.udpFrame(to: dns, port: 53, payload: Self.query("example.com", id: 7))
        try guest.send(allowed)
        #expect(try guest.readFromPeer() == allowed)
        #expect(guest.device.statistics.droppedByFilter == 1 && guest.device.statistics.transmittedFrames == 1)
    }
}
