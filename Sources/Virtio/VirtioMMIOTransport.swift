import GuestMemory
import Synchronization
import SwiftletSystem

/// The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): a 0x200-byte register block
/// through which the driver discovers the device, negotiates features, configures queues and
/// notifies them; device-specific configuration follows at 0x100.
public final class VirtioMMIOTransport: MMIODevice {
    /// Register offsets.
    public enum Register {
        public static let magic: UInt64 = 0x000
        public static let version: UInt64 = 0x004
        public static let deviceID: UInt64 = 0x008
        public static let vendorID: UInt64 = 0x00C
        public static let deviceFeatures: UInt64 = 0x010
        public static let deviceFeaturesSelect: UInt64 = 0x014
        public static let driverFeatures: UInt64 = 0x020
        public static let driverFeaturesSelect: UInt64 = 0x024
        public static let queueSelect: UInt64 = 0x030
        public static let queueSizeMaximum: UInt64 = 0x034
        public static let queueSize: UInt64 = 0x038
        public static let queueReady: UInt64 = 0x044
        public static let queueNotify: UInt64 = 0x050
        public static let interruptStatus: UInt64 = 0x060
        public static let interruptAcknowledge: UInt64 = 0x064
        public static let status: UInt64 = 0x070
        public static let queueDescriptorLow: UInt64 = 0x080
        public static let queueDescriptorHigh: UInt64 = 0x084
        public static let queueDriverLow: UInt64 = 0x090
        public static let queueDriverHigh: UInt64 = 0x094
        public static let queueDeviceLow: UInt64 = 0x0A0
        public static let queueDeviceHigh: UInt64 = 0x0A4
        public static let configurationGeneration: UInt64 = 0x0FC
        public static let configuration: UInt64 = 0x100
    }
    public static let magicValue: UInt32 = 0x7472_6976 // "virt"
    public static let vendor: UInt32 = 0x5446_5753     // "SWFT" in little-endian ASCII
    /// The size of the register block, for the bus and the firmware tables.
    public static let windowSize: UInt64 = 0x1000

    struct Registers {
        var deviceFeaturesSelect: UInt32 = 0
        var driverFeaturesSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSelect: UInt32 = 0
        var status: UInt32 = 0
        var queues: [Virtqueue]
        var active = false
    }

    public let device: any VirtioDevice
    public let interrupt: VirtioInterrupt
    let memory: GuestMemory
    private let registers: Mutex<Registers>
    /// Called when the device fails in a way the driver cannot see (for the VMM's log).
    private let onError: @Sendable (SwiftletError) -> Void

    public init(device: any VirtioDevice, memory: GuestMemory, interrupt: VirtioInterrupt,
                onError: @escaping @Sendable (SwiftletError) -> Void = { _ in }) {
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.onError = onError
        self.registers = Mutex(Registers(queues: device.queueMaximumSizes.map { Virtqueue(maximumSize: $0) }))
    }

    func registersSnapshot() -> Registers { registers.withLock { $0 } }

    func restoreRegisters(_ s: VirtioTransportState) {
        registers.withLock { r in
            r = Registers(deviceFeaturesSelect: s.deviceFeaturesSelect, driverFeaturesSelect: s.driverFeaturesSelect,
                          driverFeatures: s.driverFeatures, queueSelect: s.queueSelect, status: s.status, queues: s.queues,
                          active: s.active)
        }
    }

    /// The driver's status register (for tests and diagnostics).
    public var status: UInt32 { registers.withLock { $0.status } }

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)
        if offset >= Register.configuration {
            device.readConfiguration(offset: Int(offset - Register.configuration), into: data)
            return
        }
        // Registers below the configuration space are 32 bits wide and read whole.
        guard data.count == 4, offset % 4 == 0 else { return }
        let value: UInt32 = registers.withLock { r in
            switch offset {
            case Register.magic: return Self.magicValue
            case Register.version: return 2
            case Register.deviceID: return device.deviceType.rawValue
            case Register.vendorID: return Self.vendor
            case Register.deviceFeatures:
                let features = device.offeredFeatures
                return r.deviceFeaturesSelect == 0 ? UInt32(truncatingIfNeeded: features)
                    : r.deviceFeaturesSelect == 1 ? UInt32(truncatingIfNeeded: features >> 32) : 0
            case Register.queueSizeMaximum:
                return Int(r.queueSelect) < r.queues.count ? UInt32(r.queues[Int(r.queueSelect)].maximumSize) : 0
            case Register.queueReady:
                return Int(r.queueSelect) < r.queues.count && r.queues[Int(r.queueSelect)].isReady ? 1 : 0
            case Register.interruptStatus: return interrupt.status
            case Register.status: return r.status
            case Register.configurationGeneration: return device.configurationGeneration
            default: return 0
            }
        }
        data.storeBytes(of: value.littleEndian, as: UInt32.self)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= Register.configuration {
            device.writeConfiguration(offset: Int(offset - Register.configuration), data: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else { return }
        let value = UInt32(littleEndian: data.loadUnaligned(as: UInt32.self))
        switch offset {
        case Register.queueNotify:
            let active = registers.withLock { $0.active }
            if active && Int(value) < device.queueMaximumSizes.count { device.queueNotified(Int(value)) }
        case Register.interruptAcknowledge:
            interrupt.acknowledge(value)
        case Register.status:
            writeStatus(value)
        default:
            registers.withLock { r in Self.writeRegister(offset, value, &r) }
        }
    }

    /// Writes of configuration registers; ignored once the driver has set DRIVER_OK.
    private static func writeRegister(_ offset: UInt64, _ value: UInt32, _ r: inout Registers) {
        switch offset {
        case Register.deviceFeaturesSelect: r.deviceFeaturesSelect = value
        case Register.driverFeaturesSelect: r.driverFeaturesSelect = value
        case Register.driverFeatures:
            guard r.status & VirtioStatus.featuresOK == 0 else { return }
            switch r.driverFeaturesSelect {
            case 0: r.driverFeatures = (r.driverFeatures & 0xFFFF_FFFF_0000_0000) | UInt64(value)
            case 1: r.driverFeatures = (r.driverFeatures & 0xFFFF_FFFF) | (UInt64(value) << 32)
            default: break
            }
        case Register.queueSelect: r.queueSelect = value
        default:
            guard !r.active, Int(r.queueSelect) < r.queues.count else { return }
            let q = Int(r.queueSelect)
            func low(_ a: GuestAddress) -> GuestAddress { GuestAddress((a.rawValue & 0xFFFF_FFFF_0000_0000) | UInt64(value)) }
            func high(_ a: GuestAddress) -> GuestAddress { GuestAddress((a.rawValue & 0xFFFF_FFFF) | (UInt64(value) << 32)) }
            switch offset {
            case Register.queueSize: r.queues[q].size = UInt16(truncatingIfNeeded: value)
            case Register.queueReady: r.queues[q].isReady = value & 1 == 1
            case Register.queueDescriptorLow: r.queues[q].descriptorTable = low(r.queues[q].descriptorTable)
            case Register.queueDescriptorHigh: r.queues[q].descriptorTable = high(r.queues[q].descriptorTable)
            case Register.queueDriverLow: r.queues[q].availableRing = low(r.queues[q].availableRing)
            case Register.queueDriverHigh: r.queues[q].availableRing = high(r.queues[q].availableRing)
            case Register.queueDeviceLow: r.queues[q].usedRing = low(r.queues[q].usedRing)
            case Register.queueDeviceHigh: r.queues[q].usedRing = high(r.queues[q].usedRing)
            default: break
            }
        }
    }

    /// Tells the driver that the device's configuration space changed (a configuration-change
    /// interrupt), if it drives the device; one that has not yet reads the new one when it does.
    public func configurationChanged() {
        guard registers.withLock({ $0.status & VirtioStatus.driverOK != 0 }) else { return }
        interrupt.signalConfigurationChange()
    }

    /// The status register drives the device's life: 0 resets it, FEATURES_OK is granted only for
    /// a feature set the device offered (with VERSION_1), DRIVER_OK activates it.
    private func writeStatus(_ value: UInt32) {
        if value == 0 {
            let wasActive = registers.withLock { r in
                let wasActive = r.active
                r = Registers(queues: r.queues.map { var q = $0; q.reset(); return q })
                return wasActive
            }
            if wasActive { device.reset() }
            interrupt.reset()
            return
        }
        let activation: VirtioActivation? = registers.withLock { r in
            var accepted = value
            let newly = value & ~r.status
            if newly & VirtioStatus.featuresOK != 0 {
                let offered = device.offeredFeatures
                if r.driverFeatures & ~offered != 0 || r.driverFeatures & VirtioFeature.version1 == 0 {
                    accepted &= ~VirtioStatus.featuresOK // the driver reads it back and gives up
                }
            }
            r.status = accepted
            guard newly & VirtioStatus.driverOK != 0, accepted & VirtioStatus.featuresOK != 0, !r.active else { return nil }
            var queues = r.queues
            for i in queues.indices {
                queues[i].eventIndex = r.driverFeatures & VirtioFeature.eventIndex != 0
                queues[i].indirectDescriptors = r.driverFeatures & VirtioFeature.indirectDescriptors != 0
                guard queues[i].isReady else { continue }
                do throws(SwiftletError) {
                    try queues[i].validate(memory: memory)
                } catch {
                    onError(SwiftletError(error.code, "virtio \(device.deviceType) queue \(i): \(error.message)"))
                    r.status |= VirtioStatus.deviceNeedsReset
                    return nil
                }
            }
            r.active = true
            return VirtioActivation(memory: memory, queues: queues, features: r.driverFeatures, interrupt: interrupt)
        }
        guard let activation else { return }
        do throws(SwiftletError) {
            try device.activate(activation)
        } catch {
            onError(error)
            registers.withLock { $0.status |= VirtioStatus.deviceNeedsReset }
        }
    }
}
