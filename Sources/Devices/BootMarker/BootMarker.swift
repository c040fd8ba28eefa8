import SwiftletSystem

/// The guest's "I have booted" signal: byte 123 written to I/O port 0x3F0 (the same ABI as
/// Firecracker's boot timer). The VMM records when it arrives.
public final class BootMarker: PortIODevice {
    public static let port: UInt16 = 0x3F0
    public static let magic: UInt8 = 123

    private let onMarker: @Sendable (UInt64) -> Void

    /// `onMarker` receives the CLOCK_MONOTONIC time (ns) of the write.
    public init(onMarker: @escaping @Sendable (UInt64) -> Void) {
        self.onMarker = onMarker
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        data.fill(0xFF)
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        if offset == 0 && data.firstByte == Self.magic { onMarker(MonotonicClock.now) }
    }
}
