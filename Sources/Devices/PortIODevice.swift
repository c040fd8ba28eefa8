/// A device on the x86 I/O port bus. `offset` is relative to the base the device was
/// registered at. Accesses may come from several vCPU threads at once: devices lock.
public protocol PortIODevice: AnyObject, Sendable {
    /// Fills `data` (1, 2 or 4 bytes) with the value read at `offset`.
    func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer)
    /// Handles the guest writing `data` at `offset`.
    func write(offset: UInt16, data: UnsafeRawBufferPointer)
}

/// Where a device sends bytes meant for the user (a serial port's transmitter, say).
public protocol ByteSink: Sendable {
    func write(_ byte: UInt8)
}

extension UnsafeRawBufferPointer {
    /// The first byte, or 0 for an empty access.
    @inlinable var firstByte: UInt8 { isEmpty ? 0 : self[0] }
}

extension UnsafeMutableRawBufferPointer {
    /// Sets every byte to `value` (all-ones reads as "nothing here" on a PC bus).
    @inlinable func fill(_ value: UInt8) {
        for i in indices { self[i] = value }
    }
}
