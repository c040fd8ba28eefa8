import GuestMemory
import SwiftletSystem
import Virtio

/// Virtqueue walking: `next`, `addUsed`, `putBack` and `shouldInterrupt` over guest memory the
/// input fills. Input: a config byte (see `GuestImage.queue`), a step count, a bit mask of steps
/// that put their chain back, then the memory image.
enum VirtqueueFuzz {
    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let config = input.byte(), steps = Int(input.byte() % 64) + 1, putBacks = input.integer(UInt64.self)
        GuestImage.load(input.rest())
        let memory = GuestImage.memory
        var queue = GuestImage.queue(0, config: config, maximumSize: 256)
        do throws(SwiftletError) {
            try queue.validate(memory: memory)
            for step in 0..<steps {
                guard let chain = try queue.next(memory: memory) else { break }
                GuestImage.checkChain(chain, queueSize: queue.size)
                if putBacks >> (step % 64) & 1 != 0 {
                    try queue.putBack(memory: memory)
                    continue
                }
                try queue.addUsed(head: chain.head, length: UInt32(truncatingIfNeeded: chain.writableLength), memory: memory)
                _ = try queue.shouldInterrupt(memory: memory)
            }
        } catch {
            // A ring the device cannot follow: reported, and the queue stops being served.
        }
    }

    static func seeds() throws -> [[UInt8]] {
        var plain = GuestImageBuilder()
        let a = plain.buffer([1, 2, 3, 4]), b = plain.buffer([], length: 64)
        plain.chain(0, [(a, 4, false), (b, 64, true)])
        plain.chain(0, [(b, 16, true)])
        var indirect = GuestImageBuilder()
        let data = indirect.buffer([], length: 32)
        // An indirect table of two descriptors, pointed to by one descriptor flagged INDIRECT.
        let tableBytes = littleEndian(data) + littleEndian(UInt32(16)) + littleEndian(VirtqueueDescriptor.flagNext) + littleEndian(UInt16(1))
            + littleEndian(data + 16) + littleEndian(UInt32(16)) + littleEndian(VirtqueueDescriptor.flagWrite) + littleEndian(UInt16(0))
        let table = indirect.buffer(tableBytes)
        indirect.put(littleEndian(table) + littleEndian(UInt32(32)) + littleEndian(VirtqueueDescriptor.flagIndirect) + littleEndian(UInt16(0)), at: 0)
        indirect.put(littleEndian(UInt16(0)) + littleEndian(UInt16(1)) + littleEndian(UInt16(0)), at: Int(GuestImage.availableRing(0)))
        return [[4, 4, 0, 0, 0, 0, 0, 0, 0, 0] + plain.image,
                [4 | 8, 4, 2, 0, 0, 0, 0, 0, 0, 0] + plain.image,
                [4 | 16, 2, 0, 0, 0, 0, 0, 0, 0, 0] + indirect.image]
    }
}
