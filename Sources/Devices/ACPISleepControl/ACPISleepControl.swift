/// The hardware-reduced ACPI sleep control register: writing SLP_EN with sleep type S5 powers the
/// machine off (`poweroff` in the guest).
public final class ACPISleepControl: PortIODevice {
    static let sleepEnable: UInt8 = 1 << 5
    static let sleepTypeShift: UInt8 = 2
    static let sleepTypeMask: UInt8 = 0x7

    private let softOffType: UInt8
    private let onPowerOff: @Sendable () -> Void

    /// `softOffType` is the S5 value the DSDT's `\_S5` package advertises.
    public init(softOffType: UInt8, onPowerOff: @escaping @Sendable () -> Void) {
        self.softOffType = softOffType
        self.onPowerOff = onPowerOff
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        data.fill(0)
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        let value = data.firstByte
        let type = (value >> Self.sleepTypeShift) & Self.sleepTypeMask
        if value & Self.sleepEnable != 0 && type == softOffType { onPowerOff() }
    }
}
