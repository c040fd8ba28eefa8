import FoundationEssentials
import GuestMemory
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

/// Saving a virtio device's transport and queues, and restoring them into a new device over a copy
/// of guest memory, as a snapshot and its restore do.
@Suite struct VirtioStateTests {
    typealias R = VirtioMMIOTransport.Register

    func write(_ t: VirtioMMIOTransport, _ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { t.write(offset: offset, data: $0) }
    }

    func bringUp(_ t: VirtioMMIOTransport, driver: VirtqueueDriver) {
        let features = t.device.offeredFeatures
        let ok = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK
        write(t, R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        write(t, R.driverFeaturesSelect, 0)
        write(t, R.driverFeatures, UInt32(truncatingIfNeeded: features))
        write(t, R.driverFeaturesSelect, 1)
        write(t, R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        write(t, R.status, ok)
        write(t, R.queueSelect, 0)
        write(t, R.queueSize, UInt32(driver.size))
        write(t, R.queueDescriptorLow, UInt32(driver.descriptorTable.rawValue))
        write(t, R.queueDriverLow, UInt32(driver.availableRing.rawValue))
        write(t, R.queueDeviceLow, UInt32(driver.usedRing.rawValue))
        write(t, R.queueReady, 1)
        write(t, R.status, ok | VirtioStatus.driverOK)
    }

    @Test func anActiveDeviceGoesOnFromItsSavedRingPositions() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        let original = VirtioMMIOTransport(device: VirtioRNG(), memory: memory, interrupt: VirtioInterrupt(line: CountingLine()))
        var driver = VirtqueueDriver(memory: memory)
        bringUp(original, driver: driver)
        for _ in 0..<3 {
            try driver.publish(try driver.chain([(try driver.buffer(32), 32, true)]))
            write(original, R.queueNotify, 0)
        }
        #expect(try driver.used(2) == (2, 32))
        let state = try original.saveState()
        #expect(state.active && state.queues[0].nextAvailable == 3 && state.queues[0].nextUsed == 3)
        #expect(state.interruptStatus == VirtioInterrupt.usedBuffer)
        #expect(try JSONDecoder().decode(VirtioTransportState.self, from: JSONEncoder().encode(state)) == state)

        // A new device over a copy of memory: the next request is the fourth, and lands in slot 3.
        let copy = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        try copy.write(try memory.read(count: 4 << 20, at: GuestAddress(0)), at: GuestAddress(0))
        let restored = VirtioMMIOTransport(device: VirtioRNG(), memory: copy, interrupt: VirtioInterrupt(line: CountingLine()))
        try restored.restoreState(state)
        #expect(restored.status == state.status)
        #expect(restored.interrupt.status == VirtioInterrupt.usedBuffer)
        var copyDriver = driver.moved(to: copy)
        let buffer = try copyDriver.buffer(16)
        try copyDriver.publish(try copyDriver.chain([(buffer, 16, true)]))
        write(restored, R.queueNotify, 0)
        #expect(try copyDriver.used(3).length == 16)
        #expect(try copy.read(count: 16, at: buffer).contains { $0 != 0 })
        #expect(try restored.saveState().queues[0].nextUsed == 4)
    }

    @Test func stateForAnotherDeviceOrABrokenQueueIsRefused() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        let rng = VirtioMMIOTransport(device: VirtioRNG(), memory: memory, interrupt: VirtioInterrupt(line: CountingLine()))
        let driver = VirtqueueDriver(memory: memory)
        bringUp(rng, driver: driver)
        var state = try rng.saveState()
        state.deviceType = VirtioDeviceType.block.rawValue
        let other = VirtioMMIOTransport(device: VirtioRNG(), memory: memory, interrupt: VirtioInterrupt(line: CountingLine()))
        #expect { try other.restoreState(state) } throws: { ($0 as! SwiftletError).message.contains("another kind of device") }
        state = try rng.saveState()
        state.queues[0].usedRing = GuestAddress(64 << 20)
        #expect { try other.restoreState(state) } throws: { ($0 as! SwiftletError).message.contains("lies outside guest memory") }
    }
}

struct NoPorts: VsockHostPorts {
    func accept(port: UInt32, from guestPort: UInt32) -> Int32? { nil }
}
