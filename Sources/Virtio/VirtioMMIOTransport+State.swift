import GuestMemory
import SwiftletSystem

/// A virtio-mmio transport's state and its device's queues, as plain values (for snapshots).
public struct VirtioTransportState: Codable, Sendable, Equatable {
    public var deviceType: UInt32
    public var deviceFeaturesSelect: UInt32
    public var driverFeaturesSelect: UInt32
    public var driverFeatures: UInt64
    public var queueSelect: UInt32
    public var status: UInt32
    /// Whether the driver set DRIVER_OK and the device is serving its queues.
    public var active: Bool
    /// The queues, with the device's ring positions when it is active.
    public var queues: [Virtqueue]
    public var interruptStatus: UInt32
    /// The device's own configuration values (`VirtioDevice.savedConfiguration`), if it keeps any.
    public var configuration: [UInt32]? = nil
}

extension VirtioMMIOTransport {
    /// Whether the device's state fits in a `VirtioTransportState` (it has no state of its own
    /// beyond its queues and its configuration).
    public var canSaveState: Bool { device.servedQueues?.count == device.queueMaximumSizes.count }

    /// The transport's and device's state. Nothing may be serving the device's queues meanwhile
    /// (the machine is paused: requests are served on vCPU threads).
    public func saveState() throws(SwiftletError) -> VirtioTransportState {
        guard let served = device.servedQueues, served.count == device.queueMaximumSizes.count else {
            throw SwiftletError(.unsupported, "virtio \(device.deviceType) devices cannot be snapshotted yet")
        }
        let r = registersSnapshot()
        var queues = r.queues
        if r.active {
            for (index, queue) in served.enumerated() {
                if let queue { queues[index] = queue }
            }
        }
        return VirtioTransportState(deviceType: device.deviceType.rawValue, deviceFeaturesSelect: r.deviceFeaturesSelect,
                                    driverFeaturesSelect: r.driverFeaturesSelect, driverFeatures: r.driverFeatures,
                                    queueSelect: r.queueSelect, status: r.status, active: r.active, queues: queues,
                                    interruptStatus: interrupt.status, configuration: device.savedConfiguration)
    }

    /// Puts back a saved state before the guest runs; an active device starts serving its queues
    /// from where they were.
    public func restoreState(_ state: VirtioTransportState) throws(SwiftletError) {
        guard state.deviceType == device.deviceType.rawValue, state.queues.count == device.queueMaximumSizes.count,
              zip(state.queues, device.queueMaximumSizes).allSatisfy({ $0.maximumSize == $1 }) else {
            throw SwiftletError(.invalidFormat, "saved virtio device state is for another kind of device than \(device.deviceType)")
        }
        if let configuration = state.configuration { try device.restoreConfiguration(configuration) }
        restoreRegisters(state)
        interrupt.restore(state.interruptStatus)
        guard state.active else { return }
        for (index, queue) in state.queues.enumerated() where queue.isReady {
            do throws(SwiftletError) { try queue.validate(memory: memory) } catch {
                throw SwiftletError(error.code, "saved virtio \(device.deviceType) queue \(index): \(error.message)")
            }
        }
        try device.activate(VirtioActivation(memory: memory, queues: state.queues, features: state.driverFeatures, interrupt: interrupt))
        device.didRestore()
    }
}
