import Virtio

/// Routes guest accesses to unbacked guest-physical addresses to devices by address range.
/// Built before the vCPUs start; immutable after.
public struct MMIOBus: Sendable {
    struct Entry: Sendable {
        let base: UInt64
        let length: UInt64
        let device: any MMIODevice
    }
    private var entries: [Entry] = []

    public init() {}

    /// Adds `device` at [base, base + length). Ranges must not overlap.
    public mutating func register(_ device: any MMIODevice, base: UInt64, length: UInt64) {
        precondition(length > 0 && !entries.contains { base < $0.base &+ $0.length && $0.base < base &+ length }, "overlapping MMIO ranges")
        entries.append(Entry(base: base, length: length, device: device))
    }

    /// Handles an access; returns false when no device claims the address (reads then see all-ones).
    @discardableResult
    public func dispatch(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer) -> Bool {
        for entry in entries where address >= entry.base && address - entry.base < entry.length {
            if isWrite {
                entry.device.write(offset: address - entry.base, data: UnsafeRawBufferPointer(data))
            } else {
                entry.device.read(offset: address - entry.base, into: data)
            }
            return true
        }
        if !isWrite { for i in data.indices { data[i] = 0xFF } }
        return false
    }
}
