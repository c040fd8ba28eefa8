import GuestMemory
import Synchronization
import SwiftletSystem

/// A split virtqueue (virtio 1.2, section 2.7), seen from the device.
///
/// The driver publishes chains in the available ring; the device takes them with `next`, and
/// returns them with `addUsed`, then asks `shouldInterrupt` whether the driver wants to hear
/// about it. Ring fields shared with the guest are read and written through `GuestMemory`, with
/// fences where the spec orders them (the index after the entries, in both directions).
public struct Virtqueue: Sendable, Codable, Equatable {
    /// The largest size the device accepts (`QueueNumMax`).
    public let maximumSize: UInt16
    /// What the driver configured through the transport.
    public var size: UInt16
    public var isReady = false
    public var descriptorTable = GuestAddress(0)
    public var availableRing = GuestAddress(0)
    public var usedRing = GuestAddress(0)

    /// Negotiated features that change how the ring is used.
    public var eventIndex = false
    public var indirectDescriptors = false

    /// The next available-ring slot to consume and the next used-ring slot to fill (free-running).
    public private(set) var nextAvailable: UInt16 = 0
    public private(set) var nextUsed: UInt16 = 0
    /// `nextUsed` when the driver was last interrupted (for event-index suppression).
    private var usedAtLastInterrupt: UInt16 = 0

    public init(maximumSize: UInt16) {
        precondition(maximumSize > 0 && maximumSize & (maximumSize - 1) == 0, "queue sizes are powers of two")
        self.maximumSize = maximumSize
        self.size = maximumSize
    }

    // Ring field offsets.
    static let availableIndexOffset: UInt64 = 2
    static let ringOffset: UInt64 = 4
    static let usedElementSize: UInt64 = 8
    static let availableFlagNoInterrupt: UInt16 = 1

    /// Checks the driver's configuration before the queue goes live: a power-of-two size no larger
    /// than the maximum, aligned rings that lie inside guest memory.
    public func validate(memory: GuestMemory) throws(SwiftletError) {
        guard size > 0, size <= maximumSize, size & (size - 1) == 0 else {
            throw SwiftletError(.invalidArgument, "virtqueue size \(size) is not a power of two up to \(maximumSize)")
        }
        let n = UInt64(size)
        let areas: [(String, GuestAddress, UInt64, UInt64)] = [
            ("descriptor table", descriptorTable, 16 * n, 16),
            ("available ring", availableRing, 6 + 2 * n, 2),
            ("used ring", usedRing, 6 + Self.usedElementSize * n, 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address.rawValue % alignment == 0 else {
                throw SwiftletError(.invalidArgument, "virtqueue \(name) at \(address) is not \(alignment)-byte aligned")
            }
            guard memory.contains(address, length: length) else {
                throw SwiftletError(.outOfBounds, "virtqueue \(name) at \(address) (\(length) bytes) lies outside guest memory")
            }
        }
    }

    /// Takes the next chain the driver made available, or nil when there is none.
    public mutating func next(memory: GuestMemory) throws(SwiftletError) -> DescriptorChain? {
        let published: UInt16 = try memory.read(at: availableRing + Self.availableIndexOffset)
        guard published != nextAvailable else { return nil }
        guard published &- nextAvailable <= size else {
            throw SwiftletError(.invalidFormat, "virtqueue available index jumped from \(nextAvailable) to \(published), more than the queue size \(size)")
        }
        // Entries are read only after the index that published them.
        atomicMemoryFence(ordering: .acquiring)
        let slot = UInt64(nextAvailable % size)
        let head: UInt16 = try memory.read(at: availableRing + Self.ringOffset + 2 * slot)
        nextAvailable &+= 1
        if eventIndex {
            // avail_event: interrupt-free notification suppression; ask to hear about the next one.
            try memory.write(nextAvailable, at: usedRing + Self.ringOffset + Self.usedElementSize * UInt64(size))
        }
        return try DescriptorChain.walk(memory: memory, table: descriptorTable, queueSize: size, head: head,
                                        indirect: indirectDescriptors)
    }

    /// Gives back the chain `next` just returned, unused: the next call returns it again. For
    /// devices that take a buffer before knowing whether they have anything to put in it.
    public mutating func putBack(memory: GuestMemory) throws(SwiftletError) {
        nextAvailable &-= 1
        if eventIndex {
            try memory.write(nextAvailable, at: usedRing + Self.ringOffset + Self.usedElementSize * UInt64(size))
        }
    }

    /// Returns chain `head` to the driver, saying the device wrote `length` bytes into it.
    public mutating func addUsed(head: UInt16, length: UInt32, memory: GuestMemory) throws(SwiftletError) {
        let slot = UInt64(nextUsed % size)
        let element = usedRing + Self.ringOffset + Self.usedElementSize * slot
        try memory.write(UInt32(head), at: element)
        try memory.write(length, at: element + 4)
        nextUsed &+= 1
        // The element must be visible before the index that publishes it.
        atomicMemoryFence(ordering: .releasing)
        try memory.write(nextUsed, at: usedRing + Self.availableIndexOffset)
    }

    /// Whether the driver wants an interrupt for the buffers used since the last one.
    public mutating func shouldInterrupt(memory: GuestMemory) throws(SwiftletError) -> Bool {
        // The used index write must be visible before reading the driver's suppression state.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        defer { usedAtLastInterrupt = nextUsed }
        if eventIndex {
            let usedEvent: UInt16 = try memory.read(at: availableRing + Self.ringOffset + 2 * UInt64(size))
            // virtio 1.2, 2.7.10: interrupt if used_event lies in [old, new).
            return nextUsed &- usedEvent &- 1 < nextUsed &- usedAtLastInterrupt
        }
        let flags: UInt16 = try memory.read(at: availableRing)
        return flags & Self.availableFlagNoInterrupt == 0
    }

    /// Back to the state after a device reset.
    public mutating func reset() {
        self = Virtqueue(maximumSize: maximumSize)
    }
}
