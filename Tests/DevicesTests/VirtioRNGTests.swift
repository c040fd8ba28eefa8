import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

@Suite struct VirtioRNGTests {
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])

    func activate(_ device: VirtioRNG, driver: VirtqueueDriver, line: CountingLine) throws {
        try device.activate(VirtioActivation(memory: memory, queues: [driver.queue()], features: device.offeredFeatures,
                                             interrupt: VirtioInterrupt(line: line)))
    }

    @Test func fillsEveryWritableBufferWithFreshBytes() throws {
        let device = VirtioRNG()
        var driver = VirtqueueDriver(memory: memory)
        let line = CountingLine()
        try activate(device, driver: driver, line: line)
        let a = try driver.buffer(64), b = try driver.buffer(200)
        try driver.publish(try driver.chain([(a, 64, true), (b, 200, true)]))
        device.queueNotified(0)
        #expect(try driver.used(0) == (0, 264))
        #expect(line.raised.load(ordering: .relaxed) == 1)
        let first = try memory.read(count: 64, at: a)
        #expect(first.contains { $0 != 0 })
        try driver.publish(try driver.chain([(a, 64, true)]))
        device.queueNotified(0)
        #expect(try memory.read(count: 64, at: a) != first, "two requests must not get the same bytes")
    }

    @Test func aFailingSourceReturnsOnlyWhatWasFilled() throws {
        let log = WarningLog()
        let calls = Atomic<Int>(0)
        let device = VirtioRNG(onError: { e in log.withLock { $0.append(e.description) } }, fill: { buffer throws(SwiftletError) in
            if calls.add(1, ordering: .relaxed).newValue > 1 { throw SwiftletError(.systemCall, "getrandom failed", cause: .ioError) }
            for i in buffer.indices { buffer[i] = 7 }
        })
        var driver = VirtqueueDriver(memory: memory)
        try activate(device, driver: driver, line: CountingLine())
        let a = try driver.buffer(16), b = try driver.buffer(16)
        try driver.publish(try driver.chain([(a, 16, true), (b, 16, true)]))
        device.queueNotified(0)
        #expect(try driver.used(0) == (0, 16))
        #expect(log.withLock { $0 }.count == 1)
    }

    @Test func readableBuffersAreLeftAlone() throws {
        let device = VirtioRNG()
        var driver = VirtqueueDriver(memory: memory)
        try activate(device, driver: driver, line: CountingLine())
        let a = try driver.buffer(16, bytes: [UInt8](repeating: 9, count: 16))
        try driver.publish(try driver.chain([(a, 16, false)]))
        device.queueNotified(0)
        #expect(try driver.used(0) == (0, 0))
        #expect(try memory.read(count: 16, at: a) == [UInt8](repeating: 9, count: 16))
    }

    @Test func servesNothingBeforeActivationOrAfterReset() throws {
        let device = VirtioRNG()
        var driver = VirtqueueDriver(memory: memory)
        let a = try driver.buffer(8)
        try driver.publish(try driver.chain([(a, 8, true)]))
        device.queueNotified(0)
        #expect(try driver.usedIndex == 0)
        try activate(device, driver: driver, line: CountingLine())
        device.reset()
        device.queueNotified(0)
        #expect(try driver.usedIndex == 0)
        #expect(throws: SwiftletError.self) {
            try device.activate(VirtioActivation(memory: memory, queues: [Virtqueue(maximumSize: 16)], features: 0,
                                                 interrupt: VirtioInterrupt(line: CountingLine())))
        }
    }

    @Test func aHugeChainGetsAtMostTheRequestCap() throws {
        let filled = Atomic<Int>(0)
        let device = VirtioRNG(fill: { buffer throws(SwiftletError) in
            filled.add(buffer.count, ordering: .relaxed)
            buffer.initializeMemory(as: UInt8.self, repeating: 1)
        })
        var driver = VirtqueueDriver(memory: memory)
        try activate(device, driver: driver, line: CountingLine())
        // Sixteen descriptors on the same megabyte: a 16 MiB request (a full queue of 4 GiB
        // descriptors would ask for a terabyte).
        let a = try driver.buffer(1 << 20)
        try driver.publish(try driver.chain(Array(repeating: (a, UInt32(1 << 20), true), count: 16)))
        device.queueNotified(0)
        #expect(try driver.used(0) == (0, UInt32(VirtioRNG.maximumBytesPerRequest)))
        #expect(filled.load(ordering: .relaxed) == Int(VirtioRNG.maximumBytesPerRequest))
    }
}
