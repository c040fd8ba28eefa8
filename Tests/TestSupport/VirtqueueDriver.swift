import GuestMemory
import Virtio

/// The driver side of one split virtqueue, laid out in guest memory the way Linux does it, for
/// exercising devices without a guest: publish chains, then read what the device returned.
public struct VirtqueueDriver {
    public private(set) var memory: GuestMemory
    public let size: UInt16
    public let descriptorTable: GuestAddress
    public let availableRing: GuestAddress
    public let usedRing: GuestAddress
    /// Where `buffer(_:)` hands out data buffers.
    private var nextBuffer: GuestAddress
    private var nextDescriptor: UInt16 = 0
    private var availableIndex: UInt16 = 0

    /// A queue of `size` entries at `base` (rings first, then 1 MiB of buffers).
    public init(memory: GuestMemory, size: UInt16 = 16, base: GuestAddress = GuestAddress(0x10000)) {
        self.memory = memory
        self.size = size
        descriptorTable = base
        availableRing = base + 16 * UInt64(size)
        usedRing = GuestAddress((availableRing.rawValue + 6 + 2 * UInt64(size) + 3) & ~3)
        nextBuffer = base + 0x10000
    }

    /// The same driver state over another guest memory (a copy, as after a restore).
    public func moved(to memory: GuestMemory) -> VirtqueueDriver {
        var copy = self
        copy.memory = memory
        return copy
    }

    /// The queue as a transport would hand it to a device.
    public func queue(eventIndex: Bool = false, indirect: Bool = false) -> Virtqueue {
        var q = Virtqueue(maximumSize: 256)
        q.size = size
        q.descriptorTable = descriptorTable
        q.availableRing = availableRing
        q.usedRing = usedRing
        q.isReady = true
        q.eventIndex = eventIndex
        q.indirectDescriptors = indirect
        return q
    }

    /// Reserves `length` bytes of guest memory, filled with `bytes` if given.
    public mutating func buffer(_ length: Int, bytes: [UInt8] = []) throws -> GuestAddress {
        let address = nextBuffer
        nextBuffer = GuestAddress((nextBuffer.rawValue + UInt64(max(length, 1)) + 15) & ~15)
        if !bytes.isEmpty { try memory.write(bytes, at: address) }
        return address
    }

    /// Writes a chain of `(address, length, deviceWritable)` buffers into the table and returns its head.
    public mutating func chain(_ buffers: [(GuestAddress, UInt32, Bool)]) throws -> UInt16 {
        let head = nextDescriptor
        for (i, (address, length, writable)) in buffers.enumerated() {
            let index = nextDescriptor
            nextDescriptor = (nextDescriptor + 1) % size
            let last = i == buffers.count - 1
            let flags = (writable ? VirtqueueDescriptor.flagWrite : 0) | (last ? 0 : VirtqueueDescriptor.flagNext)
            try VirtqueueDescriptor(address: address, length: length, flags: flags, next: nextDescriptor)
                .write(to: memory, table: descriptorTable, index: index)
        }
        return head
    }

    /// Makes chain `head` available to the device.
    public mutating func publish(_ head: UInt16) throws {
        try memory.write(head, at: availableRing + 4 + 2 * UInt64(availableIndex % size))
        availableIndex &+= 1
        try memory.write(availableIndex, at: availableRing + 2)
    }

    /// Sets the available ring's flags (1 = no interrupts wanted).
    public func setAvailableFlags(_ flags: UInt16) throws {
        try memory.write(flags, at: availableRing)
    }

    /// Sets `used_event` (event-index suppression: interrupt when the used index passes it).
    public func setUsedEvent(_ value: UInt16) throws {
        try memory.write(value, at: availableRing + 4 + 2 * UInt64(size))
    }

    /// The device's used index.
    public var usedIndex: UInt16 { get throws { try memory.read(at: usedRing + 2) } }

    /// The used element in slot `i`: chain head and bytes written.
    public func used(_ i: UInt16) throws -> (head: UInt16, length: UInt32) {
        let element = usedRing + 4 + 8 * UInt64(i % size)
        return (UInt16(try memory.read(UInt32.self, at: element)), try memory.read(UInt32.self, at: element + 4))
    }
}
