/// Read-only views over the headers of one Ethernet frame. Each view checks, when it is made,
/// that every byte it will read is inside its buffer (a failed check is nil: the frame is
/// malformed), so reading a field never goes out of bounds. Views allocate nothing: they hold
/// slices of the caller's buffer, which must outlive them.

extension UnsafeRawBufferPointer {
    /// The big-endian 16-bit integer at `offset` (the caller checked `offset + 2 <= count`).
    @inline(__always) func be16(_ offset: Int) -> UInt16 { UInt16(self[offset]) << 8 | UInt16(self[offset + 1]) }

    /// The big-endian 32-bit integer at `offset` (the caller checked `offset + 4 <= count`).
    @inline(__always) func be32(_ offset: Int) -> UInt32 { UInt32(be16(offset)) << 16 | UInt32(be16(offset + 2)) }

    /// The big-endian 64-bit integer at `offset` (the caller checked `offset + 8 <= count`).
    @inline(__always) func be64(_ offset: Int) -> UInt64 { UInt64(be32(offset)) << 32 | UInt64(be32(offset + 4)) }

    /// The bytes in `range` as a buffer of their own (indices from 0).
    @inline(__always) func slice(_ range: Range<Int>) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: self[range]) }
}

enum EtherType {
    static let ipv4: UInt16 = 0x0800, arp: UInt16 = 0x0806, ipv6: UInt16 = 0x86DD
    static let vlan: UInt16 = 0x8100, qinq: UInt16 = 0x88A8
}

enum IPProtocol {
    static let icmp: UInt8 = 1, tcp: UInt8 = 6, udp: UInt8 = 17, icmpv6: UInt8 = 58
}

/// An Ethernet II header (no FCS: virtio-net and passt carry frames without it).
struct EthernetFrame {
    static let headerLength = 14
    let bytes: UnsafeRawBufferPointer

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Self.headerLength else { return nil }
        self.bytes = bytes
    }

    var etherType: UInt16 { bytes.be16(12) }
    var destination: UnsafeRawBufferPointer { bytes.slice(0..<6) }
    var source: UnsafeRawBufferPointer { bytes.slice(6..<12) }
    var payload: UnsafeRawBufferPointer { bytes.slice(Self.headerLength..<bytes.count) }
}

/// An ARP packet for IPv4 over Ethernet (the only kind a guest needs).
struct ARPPacket {
    let bytes: UnsafeRawBufferPointer

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 28, bytes.be16(0) == 1, bytes.be16(2) == EtherType.ipv4, bytes[4] == 6, bytes[5] == 4,
              (1...2).contains(bytes.be16(6)) else { return nil }
        self.bytes = bytes
    }

    var operation: UInt16 { bytes.be16(6) }
    var senderAddress: IPAddress { .v4(bytes.be32(14)) }
    var targetAddress: IPAddress { .v4(bytes.be32(24)) }
}

/// Where an IP packet's transport header starts and which transport it is, once the IP layer
/// (IPv4 options, IPv6 extension headers) is behind.
struct IPPacket {
    /// The whole IP packet, header included, without any Ethernet padding after it.
    let bytes: UnsafeRawBufferPointer
    let source: IPAddress
    let destination: IPAddress
    /// The transport protocol (after IPv6 extension headers).
    let transport: UInt8
    /// The transport header and its data (empty for a non-first fragment's view of it).
    let payload: UnsafeRawBufferPointer
    /// The length of the IP header (with IPv4 options or IPv6 extension headers).
    let headerLength: Int
    /// Whether this is a fragment other than the first (no transport header to read).
    let isLaterFragment: Bool
    /// Whether this is a fragment at all (first or later).
    let isFragment: Bool

    /// The longest chain of IPv6 extension headers walked before the packet counts as malformed.
    static let maximumExtensionHeaders = 8

    /// An IPv4 packet (`ipv6 == false`) or an IPv6 packet.
    init?(_ bytes: UnsafeRawBufferPointer, ipv6: Bool) {
        if ipv6 { self.init(v6: bytes) } else { self.init(v4: bytes) }
    }

    private init?(v4 bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 20, bytes[0] >> 4 == 4 else { return nil }
        let headerLength = Int(bytes[0] & 0x0F) * 4
        let totalLength = Int(bytes.be16(2))
        guard headerLength >= 20, totalLength >= headerLength, totalLength <= bytes.count else { return nil }
        let fragment = bytes.be16(6)
        let offset = fragment & 0x1FFF, moreFragments = fragment & 0x2000 != 0
        self.bytes = bytes.slice(0..<totalLength)
        source = .v4(bytes.be32(12))
        destination = .v4(bytes.be32(16))
        transport = bytes[9]
        self.headerLength = headerLength
        isLaterFragment = offset != 0
        isFragment = offset != 0 || moreFragments
        payload = bytes.slice(headerLength..<totalLength)
    }

    private init?(v6 bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 40, bytes[0] >> 4 == 6 else { return nil }
        let totalLength = 40 + Int(bytes.be16(4))
        guard totalLength <= bytes.count else { return nil }
        let packet = bytes.slice(0..<totalLength)
        var next = packet[6], offset = 40, laterFragment = false, fragment = false
        // Hop-by-hop (0), routing (43), fragment (44), destination options (60): walk a bounded
        // chain; anything else is the transport (or a protocol the filter does not look into).
        var walked = 0
        while next == 0 || next == 43 || next == 44 || next == 60 {
            walked += 1
            guard walked <= Self.maximumExtensionHeaders, offset + 8 <= totalLength else { return nil }
            if next == 0 && offset != 40 { return nil }  // hop-by-hop only directly after the header
            let length = next == 44 ? 8 : (Int(packet[offset + 1]) + 1) * 8
            guard offset + length <= totalLength else { return nil }
            if next == 44 {
                let field = packet.be16(offset + 2)
                fragment = true
                if field >> 3 != 0 { laterFragment = true }
            }
            next = packet[offset]
            offset += length
        }
        self.bytes = packet
        source = .v6(bytes.be64(8), bytes.be64(16))
        destination = .v6(bytes.be64(24), bytes.be64(32))
        transport = next
        headerLength = offset
        isLaterFragment = laterFragment
        isFragment = fragment
        payload = packet.slice(offset..<totalLength)
    }
}

/// A TCP header with its data.
struct TCPSegment {
    static let fin: UInt8 = 0x01, syn: UInt8 = 0x02, rst: UInt8 = 0x04, ack: UInt8 = 0x10
    let bytes: UnsafeRawBufferPointer

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 20 else { return nil }
        let dataOffset = Int(bytes[12] >> 4) * 4
        guard dataOffset >= 20, dataOffset <= bytes.count else { return nil }
        self.bytes = bytes
    }

    var sourcePort: UInt16 { bytes.be16(0) }
    var destinationPort: UInt16 { bytes.be16(2) }
    var sequence: UInt32 { bytes.be32(4) }
    var acknowledgment: UInt32 { bytes.be32(8) }
    var flags: UInt8 { bytes[13] }
    var dataLength: Int { bytes.count - Int(bytes[12] >> 4) * 4 }
    var data: UnsafeRawBufferPointer { bytes.slice(Int(bytes[12] >> 4) * 4..<bytes.count) }
    /// A connection's first segment: SYN without ACK.
    var isInitialSYN: Bool { flags & (Self.syn | Self.ack | Self.rst) == Self.syn }
}

/// A UDP header with its data (its length field checked against the bytes there).
struct UDPDatagram {
    let bytes: UnsafeRawBufferPointer

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 8 else { return nil }
        let length = Int(bytes.be16(4))
        guard length >= 8, length <= bytes.count else { return nil }
        self.bytes = bytes.slice(0..<length)
    }

    var sourcePort: UInt16 { bytes.be16(0) }
    var destinationPort: UInt16 { bytes.be16(2) }
    var data: UnsafeRawBufferPointer { bytes.slice(8..<bytes.count) }
}

/// An ICMP or ICMPv6 message: type, code, and (for echo) the 4 bytes after the checksum.
struct ICMPMessage {
    static let echoReply: UInt8 = 0, unreachable: UInt8 = 3, echoRequest: UInt8 = 8
    static let v6Unreachable: UInt8 = 1, v6EchoRequest: UInt8 = 128
    /// Router/neighbour solicitation and advertisement, redirect (RFC 4861).
    static let v6NeighbourDiscovery: ClosedRange<UInt8> = 133...137
    let bytes: UnsafeRawBufferPointer

    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 8 else { return nil }
        self.bytes = bytes
    }

    var type: UInt8 { bytes[0] }
    var code: UInt8 { bytes[1] }
}
