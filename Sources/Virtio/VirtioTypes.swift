/// Virtio device ids (virtio 1.2, section 5).
public enum VirtioDeviceType: UInt32, Sendable, Codable {
    case network = 1
    case block = 2
    case console = 3
    case entropy = 4
    case balloon = 5
    case vsock = 19
    case fileSystem = 26
}

/// Feature bits shared by every virtio device (virtio 1.2, section 6).
public enum VirtioFeature {
    /// Descriptors may point to a table of further descriptors.
    public static let indirectDescriptors: UInt64 = 1 << 28
    /// The `used_event` / `avail_event` fields suppress notifications and interrupts.
    public static let eventIndex: UInt64 = 1 << 29
    /// A virtio 1.x ("modern") device, as virtio-mmio version 2 requires.
    public static let version1: UInt64 = 1 << 32
}

/// The device status register's bits (virtio 1.2, section 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let deviceNeedsReset: UInt32 = 64
    public static let failed: UInt32 = 128
}

/// An interrupt input of the guest's interrupt controller, as a device sees it.
public protocol InterruptLine: Sendable {
    /// Drives the line high (asserted) or low.
    func setLevel(_ asserted: Bool)
}

/// A device on the memory-mapped I/O bus. `offset` is relative to the device's base address.
/// Accesses may come from several vCPU threads at once: devices lock.
public protocol MMIODevice: AnyObject, Sendable {
    /// Fills `data` (1, 2, 4 or 8 bytes) with the value read at `offset`.
    func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    /// Handles the guest writing `data` at `offset`.
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}
