import GuestMemory
import SwiftletSystem
import TestSupport
import Testing
@testable import Virtio

@Suite struct VirtqueueTests {
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])

    @Test func takesPublishedChainsInOrderAndReturnsThem() throws {
        var driver = VirtqueueDriver(memory: memory)
        var queue = driver.queue()
        #expect(try queue.next(memory: memory) == nil)
        let header = try driver.buffer(16), data = try driver.buffer(512), status = try driver.buffer(1)
        let first = try driver.chain([(header, 16, false), (data, 512, true), (status, 1, true)])
        let second = try driver.chain([(header, 16, false), (status, 1, true)])
        try driver.publish(first)
        try driver.publish(second)

        let a = try #require(try queue.next(memory: memory))
        #expect(a.head == first)
        #expect(a.readable.map(\.address) == [header])
        #expect(a.writable.map(\.address) == [data, status])
        #expect(a.readableLength == 16 && a.writableLength == 513)
        let b = try #require(try queue.next(memory: memory))
        #expect(b.head == second && b.writable.count == 1)
        #expect(try queue.next(memory: memory) == nil)

        try queue.addUsed(head: a.head, length: 513, memory: memory)
        #expect(try driver.usedIndex == 1)
        #expect(try driver.used(0) == (first, 513))
        try queue.addUsed(head: b.head, length: 1, memory: memory)
        #expect(try driver.usedIndex == 2)
        #expect(try driver.used(1) == (second, 1))
    }

    @Test func indicesWrapAroundSixteenBits() throws {
        var driver = VirtqueueDriver(memory: memory, size: 4)
        var queue = driver.queue()
        let status = try driver.buffer(1)
        for round in 0..<70_000 {
            let head = try driver.chain([(status, 1, true)])
            try driver.publish(head)
            let chain = try #require(try queue.next(memory: memory), "round \(round)")
            try queue.addUsed(head: chain.head, length: 1, memory: memory)
        }
        #expect(try driver.usedIndex == UInt16(70_000 % 65_536))
    }

    @Test func rejectsLoopsAndBadLinks() throws {
        var driver = VirtqueueDriver(memory: memory, size: 4)
        var queue = driver.queue()
        let buffer = try driver.buffer(8)
        // 0 -> 1 -> 0 ...
        try VirtqueueDescriptor(address: buffer, length: 8, flags: VirtqueueDescriptor.flagNext, next: 1)
            .write(to: memory, table: driver.descriptorTable, index: 0)
        try VirtqueueDescriptor(address: buffer, length: 8, flags: VirtqueueDescriptor.flagNext, next: 0)
            .write(to: memory, table: driver.descriptorTable, index: 1)
        try driver.publish(0)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }

        // A link beyond the queue.
        try VirtqueueDescriptor(address: buffer, length: 8, flags: VirtqueueDescriptor.flagNext, next: 9)
            .write(to: memory, table: driver.descriptorTable, index: 2)
        try driver.publish(2)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }

        // A head beyond the queue.
        try driver.publish(7)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }
    }

    @Test func rejectsBuffersOutsideGuestMemoryAndReadableAfterWritable() throws {
        var driver = VirtqueueDriver(memory: memory)
        var queue = driver.queue()
        let outside = try driver.chain([(GuestAddress(4 << 20 - 8), 16, true)])
        try driver.publish(outside)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }
        let buffer = try driver.buffer(16)
        let mixed = try driver.chain([(buffer, 1, true), (buffer, 1, false)])
        try driver.publish(mixed)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }
    }

    @Test func rejectsAnAvailableIndexThatRunsAhead() throws {
        let driver = VirtqueueDriver(memory: memory, size: 4)
        var queue = driver.queue()
        try memory.write(UInt16(5), at: driver.availableRing + 2)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }
    }

    @Test func expandsIndirectTablesOnlyWhenNegotiated() throws {
        var driver = VirtqueueDriver(memory: memory)
        let a = try driver.buffer(16), b = try driver.buffer(1)
        let table = try driver.buffer(32)
        try VirtqueueDescriptor(address: a, length: 16, flags: VirtqueueDescriptor.flagNext, next: 1).write(to: memory, table: table, index: 0)
        try VirtqueueDescriptor(address: b, length: 1, flags: VirtqueueDescriptor.flagWrite).write(to: memory, table: table, index: 1)
        try VirtqueueDescriptor(address: table, length: 32, flags: VirtqueueDescriptor.flagIndirect)
            .write(to: memory, table: driver.descriptorTable, index: 0)
        try driver.publish(0)
        try driver.publish(0)

        var plain = driver.queue(indirect: false)
        #expect(throws: SwiftletError.self) { try plain.next(memory: memory) }
        var queue = driver.queue(indirect: true)
        let chain = try #require(try queue.next(memory: memory))
        #expect(chain.readable.map(\.address) == [a])
        #expect(chain.writable.map(\.address) == [b])
        #expect(try queue.next(memory: memory)?.head == 0)

        // A table whose size is not a whole number of descriptors is refused.
        try VirtqueueDescriptor(address: table, length: 20, flags: VirtqueueDescriptor.flagIndirect)
            .write(to: memory, table: driver.descriptorTable, index: 0)
        try driver.publish(0)
        #expect(throws: SwiftletError.self) { try queue.next(memory: memory) }
    }

    @Test func honoursTheDriversInterruptSuppression() throws {
        var driver = VirtqueueDriver(memory: memory)
        var queue = driver.queue()
        let status = try driver.buffer(1)
        func roundTrip() throws {
            try driver.publish(try driver.chain([(status, 1, true)]))
            let chain = try #require(try queue.next(memory: memory))
            try queue.addUsed(head: chain.head, length: 1, memory: memory)
        }
        try roundTrip()
        #expect(try queue.shouldInterrupt(memory: memory))
        try driver.setAvailableFlags(1)
        try roundTrip()
        #expect(try !queue.shouldInterrupt(memory: memory))
    }

    @Test func eventIndexInterruptsOnlyWhenUsedEventIsPassed() throws {
        var driver = VirtqueueDriver(memory: memory)
        var queue = driver.queue(eventIndex: true)
        let status = try driver.buffer(1)
        func roundTrip() throws {
            try driver.publish(try driver.chain([(status, 1, true)]))
            let chain = try #require(try queue.next(memory: memory))
            try queue.addUsed(head: chain.head, length: 1, memory: memory)
        }
        try driver.setUsedEvent(2) // interrupt me when the used index moves past 2
        try roundTrip()             // used index 1
        #expect(try !queue.shouldInterrupt(memory: memory))
        try roundTrip()             // 2
        #expect(try !queue.shouldInterrupt(memory: memory))
        try roundTrip()             // 3: passed used_event
        #expect(try queue.shouldInterrupt(memory: memory))
        // The device publishes avail_event = the next index it will read.
        #expect(try memory.read(UInt16.self, at: driver.usedRing + 4 + 8 * UInt64(driver.size)) == 3)
    }

    @Test func validatesTheDriversConfiguration() throws {
        let driver = VirtqueueDriver(memory: memory)
        var queue = driver.queue()
        try queue.validate(memory: memory)
        queue.size = 12
        #expect(throws: SwiftletError.self) { try queue.validate(memory: memory) }
        queue.size = 512
        #expect(throws: SwiftletError.self) { try queue.validate(memory: memory) }
        queue = driver.queue()
        queue.usedRing = GuestAddress(driver.usedRing.rawValue + 2)
        #expect(throws: SwiftletError.self) { try queue.validate(memory: memory) }
        queue = driver.queue()
        queue.descriptorTable = GuestAddress(4 << 20 - 16)
        #expect(throws: SwiftletError.self) { try queue.validate(memory: memory) }
    }
}

@Suite struct DeviceQueueTests {
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])

    @Test func aHaltedQueueEndsAServeTheGuestKeepsFeeding() throws {
        var driver = VirtqueueDriver(memory: memory)
        let queue = DeviceQueue(name: "test", onError: { _ in })
        try queue.activate(VirtioActivation(memory: memory, queues: [driver.queue()], features: 0,
                                            interrupt: VirtioInterrupt(line: RecordingLine())), index: 0)
        let buffer = try driver.buffer(16)
        try driver.publish(try driver.chain([(buffer, 16, true)]))
        var served = 0
        queue.serve { chain, _ in
            served += 1
            // The guest (another vCPU) queues the buffer again as soon as it comes back, without
            // end; the machine's stop must still get this thread out.
            try? driver.publish(chain.head)
            if served == 1000 { queue.halt() }
            return 0
        }
        #expect(served == 1000)
        queue.serve { _, _ in Issue.record("a halted queue served a chain"); return 0 }
    }
}
