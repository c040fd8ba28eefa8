/// virtio-net's feature bits (virtio 1.2, section 5.1.3) that this device offers.
public enum VirtioNetFeature {
    /// VIRTIO_NET_F_CSUM: the driver may send frames with a partial checksum; the device completes it.
    public static let checksum: UInt64 = 1 << 0
    /// VIRTIO_NET_F_GUEST_CSUM: the driver accepts frames marked DATA_VALID (checksum already checked).
    public static let guestChecksum: UInt64 = 1 << 1
    /// VIRTIO_NET_F_MTU: the configuration space holds the MTU.
    public static let mtu: UInt64 = 1 << 3
    /// VIRTIO_NET_F_MAC: the configuration space holds the MAC address.
    public static let mac: UInt64 = 1 << 5
    /// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several receive buffers (num_buffers).
    public static let mergeableReceiveBuffers: UInt64 = 1 << 15
    /// VIRTIO_NET_F_STATUS: the configuration space holds the link status.
    public static let status: UInt64 = 1 << 16
}

/// `struct virtio_net_hdr` (virtio 1.2, section 5.1.6), in front of every frame in both
/// directions. With VIRTIO_F_VERSION_1 (which virtio-mmio version 2 requires) it is always 12
/// bytes: `num_buffers` is there whether or not MRG_RXBUF was negotiated (1 without it).
struct VirtioNetHeader: Equatable {
    static let size = 12
    /// flags: the driver left the checksum from `checksumStart` on to the device.
    static let needsChecksum: UInt8 = 1
    /// flags: the frame's checksum is known good (to the driver, with GUEST_CSUM).
    static let dataValid: UInt8 = 2
    /// gso_type: no segmentation offload (the only kind this device accepts; it offers none).
    static let gsoNone: UInt8 = 0
    /// Offsets of the fields in the header.
    static let checksumStartOffset = 6, checksumOffsetOffset = 8, numBuffersOffset = 10

    var flags: UInt8 = 0
    var gsoType: UInt8 = gsoNone
    var checksumStart: UInt16 = 0
    var checksumOffset: UInt16 = 0
    var numBuffers: UInt16 = 0

    init(flags: UInt8 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags
        self.numBuffers = numBuffers
    }

    /// Reads the fields the device uses from the first 12 bytes of `bytes`.
    init(bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        func le16(_ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
        flags = bytes[0]
        gsoType = bytes[1]
        checksumStart = le16(Self.checksumStartOffset)
        checksumOffset = le16(Self.checksumOffsetOffset)
        numBuffers = le16(Self.numBuffersOffset)
    }

    /// Writes the header (hdr_len and gso_size zero) into the first 12 bytes of `bytes`.
    func write(to bytes: UnsafeMutableRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        for i in 0..<Self.size { bytes[i] = 0 }
        bytes[0] = flags
        bytes[1] = gsoType
        func le16(_ value: UInt16, at offset: Int) {
            bytes[offset] = UInt8(truncatingIfNeeded: value)
            bytes[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
        }
        le16(checksumStart, at: Self.checksumStartOffset)
        le16(checksumOffset, at: Self.checksumOffsetOffset)
        le16(numBuffers, at: Self.numBuffersOffset)
    }
}

/// The Internet checksum (RFC 1071) as virtio-net's checksum offload needs it.
enum PartialChecksum {
    /// Completes a checksum the driver left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM): the driver put
    /// the pseudo-header's sum in the checksum field; the device sums the frame from `start` to its
    /// end, field included, and stores the complement at `start + offset` (0 sent as 0xFFFF, as
    /// Linux does: the two are the same number in ones' complement, and 0 means "none" to UDP).
    /// Returns false, changing nothing, when the field does not lie inside the frame.
    static func complete(_ frame: UnsafeMutableRawBufferPointer, start: Int, offset: Int) -> Bool {
        guard start >= 0, offset >= 0, start <= frame.count, offset <= frame.count - start,
              frame.count - start - offset >= 2 else { return false }
        let field = start + offset
        let sum = foldedSum(UnsafeRawBufferPointer(rebasing: frame[start...]))
        let checksum = ~sum == 0 ? 0xFFFF : ~sum
        // The sum is in memory order (see foldedSum): stored natively, its bytes are in network order.
        frame.storeBytes(of: checksum, toByteOffset: field, as: UInt16.self)
        return true
    }

    /// The ones' complement sum of `bytes` folded to 16 bits, in memory order: 16-bit words are
    /// loaded in the host's (little-endian) order, which by RFC 1071's byte-order independence
    /// gives the byte-swapped network-order sum, so storing the result natively writes the
    /// network-order bytes. Eight bytes at a time; a last odd byte counts as a word's first byte.
    static func foldedSum(_ bytes: UnsafeRawBufferPointer) -> UInt16 {
        var sum: UInt64 = 0
        var i = 0
        let count = bytes.count
        while count - i >= 8 {
            let word = bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            sum &+= (word & 0xFFFF_FFFF) &+ (word >> 32)
            i += 8
        }
        if count - i >= 4 { sum &+= UInt64(bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self)); i += 4 }
        if count - i >= 2 { sum &+= UInt64(bytes.loadUnaligned(fromByteOffset: i, as: UInt16.self)); i += 2 }
        if count - i == 1 {
            #if _endian(little)
            sum &+= UInt64(bytes[i])
            #else
            sum &+= UInt64(bytes[i]) << 8
            #endif
        }
        // At most 2^61 eight-byte words would overflow; frames are far below that.
        while sum >> 16 != 0 { sum = (sum & 0xFFFF) &+ (sum >> 16) }
        return UInt16(sum)
    }
}
