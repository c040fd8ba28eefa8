import Synchronization
import GuestMemory
import SwiftletSystem
import Virtio
@testable import Devices

/// The virtio-mmio transport: register reads and writes in any order over a virtio-blk device,
/// as a driver (or a hostile guest) would issue them. Input: up to 256 accesses of 6 bytes (an
/// operation byte: bit 0 write, bits 1-2 access size 1/2/4/8; a register offset; 4 bytes of
/// value), an empty access ending the script, then the memory image queues and buffers live in.
enum MMIOFuzz {
    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        var accesses: [(write: Bool, size: Int, offset: UInt64, value: UInt32)] = []
        while !input.isAtEnd, accesses.count < 256 {
            let operation = input.byte()
            if operation == 0xFF { break }
            accesses.append((operation & 1 != 0, 1 << Int(operation >> 1 & 3), UInt64(input.integer(UInt16.self) % 0x200),
                             input.integer(UInt32.self)))
        }
        GuestImage.load(input.rest())
        let device = VirtioBlock(backend: MemoryDisk(), readOnly: false, identifier: "fuzz")
        let transport = VirtioMMIOTransport(device: device, memory: GuestImage.memory, interrupt: VirtioInterrupt(line: NullLine()))
        var data = [UInt8](repeating: 0, count: 8)
        for access in accesses {
            if access.write {
                data = littleEndian(UInt64(access.value))
                data.withUnsafeBytes { transport.write(offset: access.offset, data: UnsafeRawBufferPointer(rebasing: $0[0..<access.size])) }
            } else {
                data.withUnsafeMutableBytes { transport.read(offset: access.offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<access.size])) }
            }
        }
        device.reset()
    }

    /// The register writes Linux's virtio_mmio driver makes to bring up queue 0 of a device
    /// (status, features, queue addresses, ready, DRIVER_OK), then a notification.
    static func seeds() -> [[UInt8]] {
        typealias R = VirtioMMIOTransport.Register
        func write(_ offset: UInt64, _ value: UInt32) -> [UInt8] { [1 | 2 << 1] + littleEndian(UInt16(offset)) + littleEndian(value) }
        func read(_ offset: UInt64) -> [UInt8] { [2 << 1] + littleEndian(UInt16(offset)) + littleEndian(UInt32(0)) }
        var script = read(R.magic) + read(R.version) + read(R.deviceID) + write(R.status, 0) + write(R.status, 1) + write(R.status, 3)
        script += write(R.deviceFeaturesSelect, 1) + read(R.deviceFeatures) + write(R.driverFeaturesSelect, 1) + write(R.driverFeatures, 1)
        script += write(R.driverFeaturesSelect, 0) + write(R.driverFeatures, 0) + write(R.status, 11) + read(R.status)
        script += write(R.queueSelect, 0) + read(R.queueSizeMaximum) + write(R.queueSize, 16)
        script += write(R.queueDescriptorLow, UInt32(GuestImage.table(0))) + write(R.queueDescriptorHigh, 0)
        script += write(R.queueDriverLow, UInt32(GuestImage.availableRing(0))) + write(R.queueDriverHigh, 0)
        script += write(R.queueDeviceLow, UInt32(GuestImage.usedRing(0))) + write(R.queueDeviceHigh, 0)
        script += write(R.queueReady, 1) + write(R.status, 15) + read(R.configuration) + write(R.queueNotify, 0)
        script += read(R.interruptStatus) + write(R.interruptAcknowledge, 1) + [0xFF]
        let image = try! BlockFuzz.seeds()[0].dropFirst(6)
        return [script + image, script]
    }
}

/// The 8250 UART: register reads and writes (2 bytes each: offset in the low 3 bits, bit 7 a
/// write, then the value), with host input when the offset byte's bit 6 is set.
enum SerialFuzz {
    final class CountingSink: ByteSink {
        let count = Atomic<Int>(0)
        func write(_ byte: UInt8) { count.add(1, ordering: .relaxed) }
    }

    static func run(_ bytes: [UInt8]) {
        let serial = Serial8250(output: CountingSink(), interrupt: NullLine())
        var input = FuzzInput(bytes)
        var hostBytes = 0
        while !input.isAtEnd {
            let operation = input.byte(), value = input.byte()
            let offset = UInt16(operation & 7)
            if operation & 0x40 != 0 {
                serial.receive([value])
                hostBytes += 1
            } else if operation & 0x80 != 0 {
                withUnsafeBytes(of: value) { serial.write(offset: offset, data: $0) }
            } else {
                var out: UInt8 = 0
                withUnsafeMutableBytes(of: &out) { serial.read(offset: offset, into: $0) }
            }
            let (held, backlog) = serial.registers.withLock { ($0.receive.count - $0.receiveHead, $0.backlog.count) }
            precondition(backlog <= hostBytes, "the 8250 holds more host input than it was given")
            precondition(held <= 16 + hostBytes, "the 8250's receive FIFO holds \(held) bytes")
        }
    }

    static func seeds() -> [[UInt8]] {
        // Linux's 8250 probe and setup: LCR, divisor latch, FIFO, MCR with OUT2, IER; a write; loopback.
        let setup: [UInt8] = [0x83, 0x80, 0x80, 0x01, 0x81, 0x00, 0x83, 0x03, 0x82, 0xC7, 0x84, 0x0B, 0x81, 0x05, 0x80, 0x41, 0x02, 0, 0x05, 0]
        let loopback: [UInt8] = [0x84, 0x1B] + (0..<20).flatMap { [0x80, UInt8($0)] } + (0..<20).flatMap { _ in [0x00, 0, 0x05, 0] }
        let input: [UInt8] = [0x81, 0x01, 0x84, 0x08, 0x40, 0x61, 0x40, 0x62, 0x02, 0, 0x00, 0, 0x00, 0]
        return [setup, loopback, input]
    }
}
