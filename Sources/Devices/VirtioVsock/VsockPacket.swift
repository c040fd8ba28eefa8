import SwiftletSystem

/// The header of a virtio-vsock packet (virtio 1.2, section 5.10.6), 44 bytes, little-endian.
public struct VsockHeader: Equatable, Sendable {
    public static let size = 44
    /// The host's context id; the guest's is configured.
    public static let hostCID: UInt64 = 2
    public static let typeStream: UInt16 = 1

    public enum Operation: UInt16, Sendable {
        case request = 1, response, reset, shutdown, readWrite, creditUpdate, creditRequest
    }
    /// SHUTDOWN flags: the sender will receive no more / send no more.
    public static let shutdownReceive: UInt32 = 1
    public static let shutdownSend: UInt32 = 2

    public var sourceCID: UInt64
    public var destinationCID: UInt64
    public var sourcePort: UInt32
    public var destinationPort: UInt32
    public var length: UInt32
    public var type: UInt16
    public var operation: UInt16
    public var flags: UInt32
    public var bufferAllocation: UInt32
    public var forwardCount: UInt32

    public init(sourceCID: UInt64, destinationCID: UInt64, sourcePort: UInt32, destinationPort: UInt32,
                length: UInt32 = 0, type: UInt16 = VsockHeader.typeStream, operation: Operation, flags: UInt32 = 0,
                bufferAllocation: UInt32 = 0, forwardCount: UInt32 = 0) {
        self.sourceCID = sourceCID; self.destinationCID = destinationCID
        self.sourcePort = sourcePort; self.destinationPort = destinationPort
        self.length = length; self.type = type; self.operation = operation.rawValue; self.flags = flags
        self.bufferAllocation = bufferAllocation; self.forwardCount = forwardCount
    }

    public init(bytes b: [UInt8]) {
        precondition(b.count >= Self.size)
        func le(_ at: Int, _ n: Int) -> UInt64 { LittleEndian.read(b, at: at, count: n) }
        sourceCID = le(0, 8); destinationCID = le(8, 8)
        sourcePort = UInt32(le(16, 4)); destinationPort = UInt32(le(20, 4))
        length = UInt32(le(24, 4)); type = UInt16(le(28, 2)); operation = UInt16(le(30, 2))
        flags = UInt32(le(32, 4)); bufferAllocation = UInt32(le(36, 4)); forwardCount = UInt32(le(40, 4))
    }

    public var bytes: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.size)
        func put(_ v: UInt64, _ n: Int) { LittleEndian.append(v, n, to: &b) }
        put(sourceCID, 8); put(destinationCID, 8); put(UInt64(sourcePort), 4); put(UInt64(destinationPort), 4)
        put(UInt64(length), 4); put(UInt64(type), 2); put(UInt64(operation), 2); put(UInt64(flags), 4)
        put(UInt64(bufferAllocation), 4); put(UInt64(forwardCount), 4)
        return b
    }

    public var op: Operation? { Operation(rawValue: operation) }
}
