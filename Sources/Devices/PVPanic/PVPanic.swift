/// The pvpanic device (ACPI id QEMU0001): the guest kernel writes here when it panics, so the VMM
/// learns of a crash at once instead of watching a stopped guest.
public final class PVPanic: PortIODevice {
    public static let panicked: UInt8 = 1 << 0
    public static let crashLoaded: UInt8 = 1 << 1

    private let onEvent: @Sendable (UInt8) -> Void

    public init(onEvent: @escaping @Sendable (UInt8) -> Void) {
        self.onEvent = onEvent
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        // The driver reads the events the device supports and enables only those.
        data.fill(0)
        if !data.isEmpty { data[0] = Self.panicked | Self.crashLoaded }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        let events = data.firstByte & (Self.panicked | Self.crashLoaded)
        if events != 0 { onEvent(events) }
    }
}
