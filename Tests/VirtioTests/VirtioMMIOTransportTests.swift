import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
@testable import Virtio

/// A device that records what the transport does to it.
final class RecordingDevice: VirtioDevice {
    let events = Mutex<[String]>([])
    let activation = Mutex<VirtioActivation?>(nil)
    let generation = Mutex<UInt32>(0)
    var configurationGeneration: UInt32 { generation.withLock { $0 } }
    var deviceType: VirtioDeviceType { .entropy }
    var offeredFeatures: UInt64 { VirtioFeature.version1 | VirtioFeature.eventIndex | 1 }
    var queueMaximumSizes: [UInt16] { [64, 64] }
    func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = UInt8(truncatingIfNeeded: offset + i + 0xA0) }
    }
    func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) { events.withLock { $0.append("config \(offset)") } }
    func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        self.activation.withLock { $0 = activation }
        events.withLock { $0.append("activate") }
    }
    func queueNotified(_ index: Int) { events.withLock { $0.append("notify \(index)") } }
    func reset() { events.withLock { $0.append("reset") } }
    var servedQueues: [Virtqueue?]? { nil }
}

final class RecordingLine: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ asserted: Bool) { levels.withLock { $0.append(asserted) } }
}

@Suite struct VirtioMMIOTransportTests {
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
    typealias R = VirtioMMIOTransport.Register

    func read(_ t: VirtioMMIOTransport, _ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { t.read(offset: offset, into: $0) }
        return UInt32(littleEndian: value)
    }

    func write(_ t: VirtioMMIOTransport, _ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { t.write(offset: offset, data: $0) }
    }

    /// What Linux's virtio_mmio driver does, up to DRIVER_OK, with queue 0 set up.
    func bringUp(_ t: VirtioMMIOTransport, driver: VirtqueueDriver, features: UInt64) {
        write(t, R.status, VirtioStatus.acknowledge)
        write(t, R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        write(t, R.driverFeaturesSelect, 0)
        write(t, R.driverFeatures, UInt32(truncatingIfNeeded: features))
        write(t, R.driverFeaturesSelect, 1)
        write(t, R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        write(t, R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        write(t, R.queueSelect, 0)
        write(t, R.queueSize, UInt32(driver.size))
        write(t, R.queueDescriptorLow, UInt32(driver.descriptorTable.rawValue))
        write(t, R.queueDescriptorHigh, 0)
        write(t, R.queueDriverLow, UInt32(driver.availableRing.rawValue))
        write(t, R.queueDeviceLow, UInt32(driver.usedRing.rawValue))
        write(t, R.queueReady, 1)
        write(t, R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
    }

    @Test func identifiesTheDevice() {
        let t = VirtioMMIOTransport(device: RecordingDevice(), memory: memory, interrupt: VirtioInterrupt(line: RecordingLine()))
        #expect(read(t, R.magic) == 0x7472_6976)
        #expect(read(t, R.version) == 2)
        #expect(read(t, R.deviceID) == 4)
        #expect(read(t, R.vendorID) != 0)
        write(t, R.deviceFeaturesSelect, 0)
        #expect(read(t, R.deviceFeatures) == UInt32(1 << 29 | 1))
        write(t, R.deviceFeaturesSelect, 1)
        #expect(read(t, R.deviceFeatures) == 1) // VERSION_1 is bit 32
        write(t, R.queueSelect, 1)
        #expect(read(t, R.queueSizeMaximum) == 64)
        write(t, R.queueSelect, 2)
        #expect(read(t, R.queueSizeMaximum) == 0, "a queue the device does not have")
        var config: [UInt8] = [0, 0]
        config.withUnsafeMutableBytes { t.read(offset: R.configuration + 3, into: $0) }
        #expect(config == [0xA3, 0xA4])
    }

    @Test func activatesWithTheNegotiatedQueuesAndForwardsNotifications() throws {
        let device = RecordingDevice()
        let t = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: RecordingLine()))
        let driver = VirtqueueDriver(memory: memory)
        write(t, R.queueNotify, 0)
        #expect(device.events.withLock { $0 }.isEmpty, "no notifications before DRIVER_OK")
        bringUp(t, driver: driver, features: VirtioFeature.version1 | VirtioFeature.eventIndex)
        #expect(t.status & VirtioStatus.featuresOK != 0)
        let activation = try #require(device.activation.withLock { $0 })
        #expect(activation.features == VirtioFeature.version1 | VirtioFeature.eventIndex)
        #expect(activation.queues[0].isReady && activation.queues[0].size == driver.size)
        #expect(activation.queues[0].descriptorTable == driver.descriptorTable)
        #expect(activation.queues[0].usedRing == driver.usedRing)
        #expect(activation.queues[0].eventIndex)
        #expect(!activation.queues[1].isReady)
        write(t, R.queueNotify, 0)
        write(t, R.queueNotify, 9) // no such queue: ignored
        #expect(device.events.withLock { $0 } == ["activate", "notify 0"])
    }

    @Test func refusesFeaturesTheDeviceDidNotOfferOrALegacyDriver() {
        for features in [VirtioFeature.version1 | (1 << 5), 1] {
            let device = RecordingDevice()
            let t = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: RecordingLine()))
            bringUp(t, driver: VirtqueueDriver(memory: memory), features: features)
            #expect(t.status & VirtioStatus.featuresOK == 0, "features \(features) must not be accepted")
            #expect(device.activation.withLock { $0 } == nil)
        }
    }

    @Test func aBadQueueAsksForAResetInsteadOfActivating() {
        let device = RecordingDevice()
        let t = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: RecordingLine()))
        var driver = VirtqueueDriver(memory: memory, base: GuestAddress(4 << 20 - 64)) // rings run off the end
        _ = try? driver.buffer(0)
        bringUp(t, driver: driver, features: VirtioFeature.version1)
        #expect(t.status & VirtioStatus.deviceNeedsReset != 0)
        #expect(device.activation.withLock { $0 } == nil)
    }

    @Test func interruptStatusDrivesTheLineUntilAcknowledged() {
        let line = RecordingLine()
        let interrupt = VirtioInterrupt(line: line)
        let t = VirtioMMIOTransport(device: RecordingDevice(), memory: memory, interrupt: interrupt)
        interrupt.signalUsedBuffer()
        interrupt.signalConfigurationChange()
        #expect(read(t, R.interruptStatus) == 3)
        write(t, R.interruptAcknowledge, 1)
        #expect(read(t, R.interruptStatus) == 2)
        #expect(line.levels.withLock { $0 }.last == true, "still pending: the line stays high")
        write(t, R.interruptAcknowledge, 2)
        #expect(read(t, R.interruptStatus) == 0)
        #expect(line.levels.withLock { $0 }.last == false)
    }

    @Test func aConfigurationChangeReachesOnlyADriverThatDrivesTheDevice() {
        let device = RecordingDevice()
        let line = RecordingLine()
        let t = VirtioMMIOTransport(device: device, memory: memory, interrupt: VirtioInterrupt(line: line))
        t.configurationChanged()
        #expect(read(t, R.interruptStatus) == 0, "before DRIVER_OK the driver reads the configuration when it probes")
        #expect(line.levels.withLock { $0 }.isEmpty)
        bringUp(t, driver: VirtqueueDriver(memory: memory), features: VirtioFeature.version1)
        #expect(read(t, R.configurationGeneration) == 0)
        device.generation.withLock { $0 = 5 }
        t.configurationChanged()
        #expect(read(t, R.interruptStatus) == VirtioInterrupt.configurationChange)
        #expect(read(t, R.configurationGeneration) == 5)
        #expect(line.levels.withLock { $0 }.last == true)
    }

    @Test func writingZeroStatusResetsTheDevice() throws {
        let device = RecordingDevice()
        let line = RecordingLine()
        let interrupt = VirtioInterrupt(line: line)
        let t = VirtioMMIOTransport(device: device, memory: memory, interrupt: interrupt)
        bringUp(t, driver: VirtqueueDriver(memory: memory), features: VirtioFeature.version1)
        interrupt.signalUsedBuffer()
        write(t, R.status, 0)
        #expect(t.status == 0)
        #expect(read(t, R.interruptStatus) == 0)
        #expect(line.levels.withLock { $0 }.last == false)
        #expect(device.events.withLock { $0 } == ["activate", "reset"])
        write(t, R.queueSelect, 0)
        #expect(read(t, R.queueReady) == 0)
        // The queue can be configured again and the device reactivated.
        bringUp(t, driver: VirtqueueDriver(memory: memory), features: VirtioFeature.version1)
        #expect(device.events.withLock { $0 } == ["activate", "reset", "activate"])
    }
}
