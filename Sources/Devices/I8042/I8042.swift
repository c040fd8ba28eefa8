/// The i8042 keyboard controller, reduced to what a VM needs: the CPU-reset command.
///
/// Linux reboots a PC by writing 0xFE (pulse reset line) to the command port 0x64; `reboot -f`
/// in the guest and the kernel's own restart path both end up here.
public final class I8042: PortIODevice {
    /// Port 0x60 is offset 0, the command/status port 0x64 is offset 4.
    static let commandOffset: UInt16 = 4
    static let resetCommand: UInt8 = 0xFE

    private let onReset: @Sendable () -> Void

    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        // Status 0: output buffer empty, input buffer empty (ready for a command). Data: nothing.
        data.fill(0)
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        if offset == Self.commandOffset && data.firstByte == Self.resetCommand { onReset() }
    }
}
