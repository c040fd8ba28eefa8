import GuestMemory
import SwiftletSystem
import Virtio

/// The guest side of the device targets: 64 KiB of guest memory whose first bytes come from the
/// input, with up to three split virtqueues at fixed places (queue i's descriptor table at
/// i * 0x400, its available ring 0x100 after it and its used ring 0x200 after it, up to 16 entries).
/// Everything the driver controls is in the input: descriptors, ring indexes, buffer addresses.
enum GuestImage {
    static let memorySize: UInt64 = 64 << 10
    static let maximumQueueSize: UInt16 = 16
    /// One memory for every run (mapping a fresh one each time costs more than the run).
    static let memory = try! GuestMemory(anonymous: [(GuestAddress(0), memorySize)])

    /// Clears guest memory and copies `image` to its start.
    static func load(_ image: [UInt8]) {
        try! memory.fill(zero: memorySize, at: GuestAddress(0))
        try! memory.write(image.prefix(Int(memorySize)), at: GuestAddress(0))
    }

    static func table(_ queue: Int) -> UInt64 { UInt64(queue) * 0x400 }
    static func availableRing(_ queue: Int) -> UInt64 { table(queue) + 0x100 }
    static func usedRing(_ queue: Int) -> UInt64 { table(queue) + 0x200 }

    /// Queue `index` as a transport would hand it to a device; `config` bits 0-2 give the size
    /// (a power of two up to 16), bit 3 event index, bit 4 indirect descriptors.
    static func queue(_ index: Int, config: UInt8, maximumSize: UInt16) -> Virtqueue {
        var q = Virtqueue(maximumSize: maximumSize)
        q.size = min(UInt16(1) << min(config & 7, 4), maximumQueueSize, maximumSize)
        q.descriptorTable = GuestAddress(table(index))
        q.availableRing = GuestAddress(availableRing(index))
        q.usedRing = GuestAddress(usedRing(index))
        q.isReady = true
        q.eventIndex = config & 8 != 0
        q.indirectDescriptors = config & 16 != 0
        return q
    }

    /// The driver publishes `count` more chains on queue `index` (the ring entries are whatever
    /// the input put there).
    static func advanceAvailable(_ index: Int, by count: UInt16) {
        let at = GuestAddress(availableRing(index) + 2)
        let current: UInt16 = (try? memory.read(at: at)) ?? 0
        try? memory.write(current &+ count, at: at)
    }

    /// Checks what a device got from `next`: every buffer lies in guest memory.
    static func checkChain(_ chain: DescriptorChain, queueSize: UInt16) {
        precondition(chain.head < queueSize, "a chain head beyond the queue was accepted")
        for d in chain.readable + chain.writable {
            precondition(memory.contains(d.address, length: UInt64(d.length)), "a buffer outside guest memory was accepted")
        }
    }
}

/// An interrupt line that goes nowhere.
final class NullLine: InterruptLine {
    func setLevel(_ asserted: Bool) {}
}

/// Builds seed images: chains laid out in the fixed queue places, with buffers from 0xC00 on.
struct GuestImageBuilder {
    var image = [UInt8](repeating: 0, count: 0xC00)
    private var nextDescriptor: [UInt16] = [0, 0, 0]
    private var published: [UInt16] = [0, 0, 0]

    mutating func put(_ bytes: [UInt8], at offset: Int) {
        if image.count < offset + bytes.count { image += [UInt8](repeating: 0, count: offset + bytes.count - image.count) }
        image.replaceSubrange(offset..<offset + bytes.count, with: bytes)
    }

    /// A buffer holding `bytes` (or `length` zero bytes), 16-byte aligned at the end of the image.
    mutating func buffer(_ bytes: [UInt8], length: Int? = nil) -> UInt64 {
        let offset = (image.count + 15) & ~15
        put(bytes + [UInt8](repeating: 0, count: max(0, (length ?? bytes.count) - bytes.count)), at: offset)
        if image.count == offset { put([0], at: offset) }
        return UInt64(offset)
    }

    /// Writes a chain of (address, length, writable) into queue `q`'s table and publishes it.
    mutating func chain(_ q: Int, _ buffers: [(UInt64, UInt32, Bool)]) {
        let head = nextDescriptor[q]
        for (i, (address, length, writable)) in buffers.enumerated() {
            let index = nextDescriptor[q]
            nextDescriptor[q] += 1
            let last = i == buffers.count - 1
            let flags = (writable ? VirtqueueDescriptor.flagWrite : 0) | (last ? 0 : VirtqueueDescriptor.flagNext)
            put(littleEndian(address) + littleEndian(length) + littleEndian(flags) + littleEndian(nextDescriptor[q]),
                at: Int(GuestImage.table(q)) + 16 * Int(index))
        }
        put(littleEndian(head), at: Int(GuestImage.availableRing(q)) + 4 + 2 * Int(published[q]))
        published[q] += 1
        put(littleEndian(published[q]), at: Int(GuestImage.availableRing(q)) + 2)
    }
}
