import GuestMemory
import SwiftletSystem

/// A virtio device model behind a transport. The transport owns feature negotiation and queue
/// configuration; when the driver sets DRIVER_OK it hands the device its queues, and from then on
/// the device owns them.
public protocol VirtioDevice: AnyObject, Sendable {
    var deviceType: VirtioDeviceType { get }
    /// Features the device offers (must include `VirtioFeature.version1`).
    var offeredFeatures: UInt64 { get }
    /// The maximum size of each of its queues; the count is the number of queues.
    var queueMaximumSizes: [UInt16] { get }
    /// Reads the device-specific configuration space.
    func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Writes the device-specific configuration space (most devices ignore it).
    func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer)
    /// Changes with every change of the configuration space, so the driver can tell a read that
    /// straddled one (ConfigGeneration).
    var configurationGeneration: UInt32 { get }
    /// The driver is ready: start serving `queues`.
    func activate(_ activation: VirtioActivation) throws(SwiftletError)
    /// The driver notified queue `index` that it has new buffers (on the notifying vCPU's thread).
    func queueNotified(_ index: Int)
    /// The driver reset the device: stop using the queues and forget them.
    func reset()
    /// For snapshots: each queue as the device is serving it now (ring positions included), in
    /// queue order, nil for one it does not serve; nil when the device keeps state a snapshot
    /// cannot hold (then it cannot be snapshotted). Read while the device is quiesced.
    var servedQueues: [Virtqueue?]? { get }
    /// While quiesced (the machine is paused), the device touches neither guest memory nor its
    /// interrupt from threads of its own; it catches up when released. Devices served only on
    /// vCPU threads have nothing to do.
    func setQuiesced(_ quiesced: Bool)
    /// The device was just restored from a snapshot and is serving its queues again: it tells the
    /// driver what did not survive (vsock: every connection).
    func didRestore()
    /// For snapshots: configuration the device keeps beyond its queues (the balloon: its target
    /// and the driver's count), as plain numbers; nil for none.
    var savedConfiguration: [UInt32]? { get }
    /// Puts back `savedConfiguration`'s values before the guest runs (a value the device cannot
    /// take is an error).
    func restoreConfiguration(_ values: [UInt32]) throws(SwiftletError)
    /// The machine is ending: stop serving, from any thread, without waiting. A loop in progress
    /// (a vCPU thread inside `queueNotified` while the guest keeps queueing buffers, or a device
    /// thread) ends at its next chain, and nothing is served afterwards.
    func requestStop()
}

extension VirtioDevice {
    public var configurationGeneration: UInt32 { 0 }
    public func setQuiesced(_ quiesced: Bool) {}
    public func didRestore() {}
    public func requestStop() {}
    public var savedConfiguration: [UInt32]? { nil }
    public func restoreConfiguration(_ values: [UInt32]) throws(SwiftletError) {
        throw SwiftletError(.invalidFormat, "saved state holds configuration for a virtio \(deviceType) device, which keeps none")
    }
}

/// What a device gets when the driver sets DRIVER_OK.
public struct VirtioActivation: Sendable {
    public let memory: GuestMemory
    public let queues: [Virtqueue]
    public let features: UInt64
    public let interrupt: VirtioInterrupt

    public init(memory: GuestMemory, queues: [Virtqueue], features: UInt64, interrupt: VirtioInterrupt) {
        self.memory = memory; self.queues = queues; self.features = features; self.interrupt = interrupt
    }
}
