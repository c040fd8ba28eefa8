/// The internet checksum (RFC 1071): the ones' complement of the ones' complement sum of 16-bit
/// big-endian words, an odd last byte padded with zero. Add the parts, then take `value`.
public struct InternetChecksum: Sendable {
    private var sum: UInt64 = 0
    /// Whether an odd byte is pending (the next byte is the low half of a word).
    private var odd = false

    public init() {}

    public mutating func add(_ bytes: UnsafeRawBufferPointer) {
        for byte in bytes {
            sum &+= odd ? UInt64(byte) : UInt64(byte) << 8
            odd.toggle()
        }
    }

    public mutating func add(_ bytes: [UInt8]) { bytes.withUnsafeBytes { add($0) } }

    public mutating func add(_ word: UInt16) { add([UInt8(word >> 8), UInt8(truncatingIfNeeded: word)]) }

    /// The checksum to store in a header.
    public var value: UInt16 {
        var folded = sum
        while folded >> 16 != 0 { folded = (folded & 0xFFFF) + (folded >> 16) }
        return ~UInt16(folded)
    }

    /// The IPv4 or IPv6 pseudo-header that TCP, UDP and ICMPv6 checksums cover (RFC 793, RFC 8200 §8.1).
    public mutating func addPseudoHeader(source: IPAddress, destination: IPAddress, protocol transport: UInt8, length: Int) {
        add(source.bytes)
        add(destination.bytes)
        if source.isV4 {
            add(UInt16(transport))
            add(UInt16(truncatingIfNeeded: length))
        } else {
            add(UInt16(truncatingIfNeeded: length >> 16))
            add(UInt16(truncatingIfNeeded: length))
            add(UInt16(transport))
        }
    }

    /// The checksum of `bytes` alone.
    public static func of(_ bytes: [UInt8]) -> UInt16 {
        var checksum = InternetChecksum()
        checksum.add(bytes)
        return checksum.value
    }
}

/// Frames the filter makes to hand the guest instead of what it sent: resets, ICMP errors, DNS
/// answers. Each answers a frame the guest sent: the Ethernet addresses are swapped, the answer
/// comes from the address the guest sent to.
enum FrameBuilder {
    static let hopLimit: UInt8 = 64

    /// An Ethernet frame carrying an IP packet from `source` to `destination` whose transport part
    /// is `transport`; `checksumAt` is where the transport checksum goes (with the pseudo-header,
    /// except for ICMPv4: `pseudoHeader: false`).
    static func frame(answering ethernet: EthernetFrame, source: IPAddress, destination: IPAddress, protocol transport: UInt8,
                      payload: [UInt8], checksumAt: Int, pseudoHeader: Bool = true) -> [UInt8] {
        var payload = payload
        var checksum = InternetChecksum()
        if pseudoHeader { checksum.addPseudoHeader(source: source, destination: destination, protocol: transport, length: payload.count) }
        checksum.add(payload)
        var value = checksum.value
        if transport == IPProtocol.udp && value == 0 { value = 0xFFFF }  // 0 means "no checksum" in UDP
        payload[checksumAt] = UInt8(value >> 8)
        payload[checksumAt + 1] = UInt8(truncatingIfNeeded: value)

        var frame = Array(ethernet.source) + Array(ethernet.destination)
        if case .v4 = source {
            frame += [0x08, 0x00]
            var header: [UInt8] = [0x45, 0] + be16(20 + payload.count) + [0, 0, 0x40, 0, hopLimit, transport, 0, 0]
            header += source.bytes + destination.bytes
            let headerChecksum = InternetChecksum.of(header)
            header[10] = UInt8(headerChecksum >> 8)
            header[11] = UInt8(truncatingIfNeeded: headerChecksum)
            frame += header
        } else {
            frame += [0x86, 0xDD, 0x60, 0, 0, 0] + be16(payload.count) + [transport, hopLimit] + source.bytes + destination.bytes
        }
        return frame + payload
    }

    static func be16(_ value: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value)] }
    static func be32(_ value: UInt32) -> [UInt8] { be16(Int(value >> 16)) + be16(Int(value & 0xFFFF)) }

    /// The reset a refused connection gets (RFC 9293 §3.10.7.1): for a segment with ACK,
    /// `<SEQ=SEG.ACK><CTL=RST>`; otherwise `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>` (SEG.LEN
    /// counts SYN and FIN). Nil for a segment that is itself a reset.
    static func reset(answering ethernet: EthernetFrame, ip: IPPacket, tcp: TCPSegment) -> [UInt8]? {
        guard tcp.flags & TCPSegment.rst == 0 else { return nil }
        var segment = be16(Int(tcp.destinationPort)) + be16(Int(tcp.sourcePort))
        if tcp.flags & TCPSegment.ack != 0 {
            segment += be32(tcp.acknowledgment) + [0, 0, 0, 0, 0x50, TCPSegment.rst]
        } else {
            let length = UInt32(truncatingIfNeeded: tcp.dataLength) &+ (tcp.flags & TCPSegment.syn != 0 ? 1 : 0)
                &+ (tcp.flags & TCPSegment.fin != 0 ? 1 : 0)
            segment += [0, 0, 0, 0] + be32(tcp.sequence &+ length) + [0x50, TCPSegment.rst | TCPSegment.ack]
        }
        segment += [0, 0, 0, 0, 0, 0]  // window, checksum, urgent pointer
        return frame(answering: ethernet, source: ip.destination, destination: ip.source, protocol: IPProtocol.tcp,
                     payload: segment, checksumAt: 16)
    }

    /// An ICMP destination unreachable (RFC 792: type 3) or ICMPv6 one (RFC 4443: type 1) about
    /// `ip`, from its destination, quoting as much of the packet as fits in 576 bytes (IPv4,
    /// RFC 1812 §4.3.2.3) or the 1280-byte minimum MTU (IPv6, RFC 4443 §3.1).
    static func unreachable(answering ethernet: EthernetFrame, ip: IPPacket, code: UInt8) -> [UInt8] {
        let v4 = ip.source.isV4
        let room = v4 ? 576 - 20 - 8 : 1280 - 40 - 8
        let quoted = Array(ip.bytes.prefix(room))
        let message = [v4 ? ICMPMessage.unreachable : ICMPMessage.v6Unreachable, code, 0, 0, 0, 0, 0, 0] + quoted
        return frame(answering: ethernet, source: ip.destination, destination: ip.source,
                     protocol: v4 ? IPProtocol.icmp : IPProtocol.icmpv6, payload: message, checksumAt: 2, pseudoHeader: !v4)
    }

    /// A UDP datagram answering `udp` (ports swapped) with `data`.
    static func udpReply(answering ethernet: EthernetFrame, ip: IPPacket, udp: UDPDatagram, data: [UInt8]) -> [UInt8] {
        let datagram = be16(Int(udp.destinationPort)) + be16(Int(udp.sourcePort)) + be16(8 + data.count) + [0, 0] + data
        return frame(answering: ethernet, source: ip.destination, destination: ip.source, protocol: IPProtocol.udp,
                     payload: datagram, checksumAt: 6)
    }
}

/// ICMP codes the filter uses.
enum ICMPCode {
    /// IPv4 type 3: port unreachable (ECONNREFUSED on a connected UDP socket), and administratively prohibited.
    static let portUnreachable: UInt8 = 3, prohibited: UInt8 = 13
    /// ICMPv6 type 1: administratively prohibited, port unreachable.
    static let v6Prohibited: UInt8 = 1, v6PortUnreachable: UInt8 = 4
}
