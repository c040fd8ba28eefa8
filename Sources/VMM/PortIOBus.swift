import Devices

/// Routes I/O port accesses to devices by port range. Built before the vCPUs start; immutable after.
public struct PortIOBus: Sendable {
    struct Entry: Sendable {
        let base: UInt16
        let length: UInt16
        let device: any PortIODevice
    }
    private var entries: [Entry] = []

    public init() {}

    /// Adds `device` at ports [base, base + length). Ranges must not overlap.
    public mutating func register(_ device: any PortIODevice, base: UInt16, length: UInt16) {
        precondition(!entries.contains { base < $0.base &+ $0.length && $0.base < base &+ length }, "overlapping port ranges")
        entries.append(Entry(base: base, length: length, device: device))
    }

    /// The device covering `port`, and the offset within it.
    func lookup(_ port: UInt16) -> (any PortIODevice, UInt16)? {
        for entry in entries where port >= entry.base && port - entry.base < entry.length {
            return (entry.device, port - entry.base)
        }
        return nil
    }

    /// Handles a port access; returns false when no device claims the port (reads then see all-ones).
    @discardableResult
    public func dispatch(port: UInt16, isWrite: Bool, data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (device, offset) = lookup(port) else {
            if !isWrite { for i in data.indices { data[i] = 0xFF } }
            return false
        }
        if isWrite {
            device.write(offset: offset, data: UnsafeRawBufferPointer(data))
        } else {
            device.read(offset: offset, into: data)
        }
        return true
    }
}
