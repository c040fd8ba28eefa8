import GuestMemory
import SwiftletSystem

/// One entry of a split virtqueue's descriptor table (virtio 1.2, section 2.7.5).
public struct VirtqueueDescriptor: Sendable, Equatable {
    public static let size: UInt64 = 16
    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2
    public static let flagIndirect: UInt16 = 4

    public var address: GuestAddress
    public var length: UInt32
    public var flags: UInt16
    public var next: UInt16

    public init(address: GuestAddress, length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        self.address = address; self.length = length; self.flags = flags; self.next = next
    }

    /// Whether the device writes this buffer (otherwise it reads it).
    public var isDeviceWritable: Bool { flags & Self.flagWrite != 0 }
    var hasNext: Bool { flags & Self.flagNext != 0 }
    var isIndirect: Bool { flags & Self.flagIndirect != 0 }

    static func read(from memory: GuestMemory, table: GuestAddress, index: UInt16) throws(SwiftletError) -> VirtqueueDescriptor {
        let at = table + UInt64(index) * size
        return VirtqueueDescriptor(address: GuestAddress(try memory.read(UInt64.self, at: at)),
                                   length: try memory.read(UInt32.self, at: at + 8),
                                   flags: try memory.read(UInt16.self, at: at + 12),
                                   next: try memory.read(UInt16.self, at: at + 14))
    }

    /// Writes the descriptor into a table (for tests and drivers).
    public func write(to memory: GuestMemory, table: GuestAddress, index: UInt16) throws(SwiftletError) {
        let at = table + UInt64(index) * Self.size
        try memory.write(address.rawValue, at: at)
        try memory.write(length, at: at + 8)
        try memory.write(flags, at: at + 12)
        try memory.write(next, at: at + 14)
    }
}

/// A request taken from a virtqueue: the head index (returned with the used element) and its
/// buffers in order, indirect tables expanded. Device-readable buffers come first, then
/// device-writable ones, as the spec requires of drivers; a chain that mixes them is rejected.
public struct DescriptorChain: Sendable {
    public let head: UInt16
    public let readable: [VirtqueueDescriptor]
    public let writable: [VirtqueueDescriptor]

    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }

    /// A guest-physical byte range inside a chain.
    public struct Segment: Sendable, Equatable {
        public var address: GuestAddress
        public var length: UInt64
    }

    /// The byte ranges of `descriptors` from byte `skipping` on, at most `keeping` bytes in all:
    /// how devices find a payload after a header, or a status byte at the end.
    public static func segments(_ descriptors: [VirtqueueDescriptor], skipping: UInt64, keeping: UInt64) -> [Segment] {
        var result: [Segment] = []
        var skip = skipping, keep = keeping
        for d in descriptors where keep > 0 {
            let length = UInt64(d.length)
            if skip >= length { skip -= length; continue }
            let n = min(length - skip, keep)
            result.append(Segment(address: d.address + skip, length: n))
            keep -= n
            skip = 0
        }
        return result
    }

    /// Copies the first `count` bytes of the readable buffers (fewer if the chain is shorter).
    public func readPrefix(_ count: Int, memory: GuestMemory) throws(SwiftletError) -> [UInt8] {
        var bytes: [UInt8] = []
        for segment in Self.segments(readable, skipping: 0, keeping: UInt64(count)) {
            bytes += try memory.read(count: Int(segment.length), at: segment.address)
        }
        return bytes
    }

    /// Writes `bytes` at the start of the writable buffers; returns how many fit.
    @discardableResult
    public func writePrefix(_ bytes: [UInt8], memory: GuestMemory) throws(SwiftletError) -> Int {
        var offset = 0
        for segment in Self.segments(writable, skipping: 0, keeping: UInt64(bytes.count)) {
            try memory.write(bytes[offset..<offset + Int(segment.length)], at: segment.address)
            offset += Int(segment.length)
        }
        return offset
    }

    /// Walks the chain that starts at `head`. `queueSize` bounds the walk (a loop is an error),
    /// and `indirect` says whether the driver negotiated indirect descriptors.
    static func walk(memory: GuestMemory, table: GuestAddress, queueSize: UInt16, head: UInt16,
                     indirect: Bool) throws(SwiftletError) -> DescriptorChain {
        var readable: [VirtqueueDescriptor] = []
        var writable: [VirtqueueDescriptor] = []
        func take(_ d: VirtqueueDescriptor) throws(SwiftletError) {
            guard memory.contains(d.address, length: UInt64(d.length)) else {
                throw SwiftletError(.outOfBounds, "virtqueue descriptor at \(d.address) (\(d.length) bytes) lies outside guest memory")
            }
            if d.isDeviceWritable {
                writable.append(d)
            } else {
                guard writable.isEmpty else {
                    throw SwiftletError(.invalidFormat, "virtqueue chain \(head) puts a device-readable buffer after a writable one")
                }
                readable.append(d)
            }
        }
        guard head < queueSize else {
            throw SwiftletError(.outOfBounds, "virtqueue head \(head) is beyond the queue size \(queueSize)")
        }
        var index = head
        var steps = 0
        while true {
            steps += 1
            guard steps <= Int(queueSize) else {
                throw SwiftletError(.invalidFormat, "virtqueue chain \(head) is longer than the queue (a loop?)")
            }
            let d = try VirtqueueDescriptor.read(from: memory, table: table, index: index)
            if d.isIndirect {
                guard indirect else { throw SwiftletError(.invalidFormat, "virtqueue chain \(head) uses indirect descriptors, which were not negotiated") }
                guard !d.hasNext else { throw SwiftletError(.invalidFormat, "virtqueue chain \(head): an indirect descriptor must not also chain") }
                try walkIndirect(memory: memory, descriptor: d, head: head, take: take)
                break
            }
            try take(d)
            guard d.hasNext else { break }
            guard d.next < queueSize else {
                throw SwiftletError(.outOfBounds, "virtqueue chain \(head) links to \(d.next), beyond the queue size \(queueSize)")
            }
            index = d.next
        }
        return DescriptorChain(head: head, readable: readable, writable: writable)
    }

    private static func walkIndirect(memory: GuestMemory, descriptor: VirtqueueDescriptor, head: UInt16,
                                     take: (VirtqueueDescriptor) throws(SwiftletError) -> Void) throws(SwiftletError) {
        let count = UInt64(descriptor.length) / VirtqueueDescriptor.size
        guard descriptor.length % UInt32(VirtqueueDescriptor.size) == 0, count > 0, count <= UInt64(UInt16.max) else {
            throw SwiftletError(.invalidFormat, "virtqueue chain \(head): indirect table of \(descriptor.length) bytes is not a whole number of descriptors")
        }
        guard memory.contains(descriptor.address, length: UInt64(descriptor.length)) else {
            throw SwiftletError(.outOfBounds, "virtqueue chain \(head): indirect table at \(descriptor.address) lies outside guest memory")
        }
        var index: UInt16 = 0
        var steps: UInt64 = 0
        while true {
            steps += 1
            guard steps <= count else { throw SwiftletError(.invalidFormat, "virtqueue chain \(head): indirect table loops") }
            let d = try VirtqueueDescriptor.read(from: memory, table: descriptor.address, index: index)
            guard !d.isIndirect else { throw SwiftletError(.invalidFormat, "virtqueue chain \(head): nested indirect table") }
            try take(d)
            guard d.hasNext else { break }
            guard UInt64(d.next) < count else {
                throw SwiftletError(.outOfBounds, "virtqueue chain \(head): indirect link \(d.next) is beyond its table of \(count)")
            }
            index = d.next
        }
    }
}
