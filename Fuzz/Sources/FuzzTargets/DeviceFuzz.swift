import Synchronization
import GuestMemory
import SwiftletSystem
import Virtio
@testable import Devices

/// Input of the single-queue device targets: a config byte (`GuestImage.queue`, bit 5: a
/// read-only disk), a round count, one available-index advance per round, then the memory image.
/// Round 1 serves what the image published; each later round publishes that many more chains
/// (the ring slots the image holds) and notifies again.
struct DeviceScript {
    var config: UInt8
    var advances: [UInt16]

    init(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        config = input.byte()
        let rounds = Int(input.byte() % 4) + 1
        advances = (0..<4).map { _ in UInt16(input.byte()) }.prefix(rounds).map { $0 }
        advances[0] = 0
        GuestImage.load(input.rest())
    }

    /// Activates `device` on queue 0 and notifies it once per round.
    func drive(_ device: some SingleQueueDevice, maximumSize: UInt16) {
        let activation = VirtioActivation(memory: GuestImage.memory, queues: [GuestImage.queue(0, config: config, maximumSize: maximumSize)],
                                          features: device.offeredFeatures, interrupt: VirtioInterrupt(line: NullLine()))
        guard (try? device.activate(activation)) != nil else { return }
        for advance in advances {
            GuestImage.advanceAvailable(0, by: advance)
            device.queueNotified(0)
        }
        device.reset()
    }

    static func header(config: UInt8, advances: [UInt8] = [0]) -> [UInt8] {
        [config, UInt8(advances.count - 1)] + (advances + [0, 0, 0, 0]).prefix(4)
    }
}

/// A disk in memory that traps on any access outside it (the device must check sectors first).
final class MemoryDisk: BlockBackend, @unchecked Sendable {
    // SAFETY (Sendable): used from the fuzzing thread only.
    var bytes = [UInt8](repeating: 0x5A, count: 64 << 10)
    var byteCount: UInt64 { UInt64(bytes.count) }

    func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        precondition(offset <= byteCount && UInt64(destination.count) <= byteCount - offset, "virtio-blk read outside the disk")
        bytes.withUnsafeBytes { destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + destination.count])) }
    }

    func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        precondition(offset <= byteCount && UInt64(source.count) <= byteCount - offset, "virtio-blk write outside the disk")
        bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + source.count]).copyMemory(from: source) }
    }

    func flush() throws(SwiftletError) {}
}

/// virtio-blk: requests of every type over a 64 KiB disk.
enum BlockFuzz {
    static func run(_ bytes: [UInt8]) {
        let script = DeviceScript(bytes)
        let disk = MemoryDisk()
        let device = VirtioBlock(backend: disk, readOnly: script.config & 32 != 0, identifier: "fuzz")
        script.drive(device, maximumSize: VirtioBlock.queueSize)
    }

    static func seeds() throws -> [[UInt8]] {
        func request(_ type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) -> [UInt8] {
            var b = GuestImageBuilder()
            let header = b.buffer(littleEndian(type) + littleEndian(UInt32(0)) + littleEndian(sector))
            var buffers: [(UInt64, UInt32, Bool)] = [(header, 16, false)]
            if !out.isEmpty { buffers.append((b.buffer(out), UInt32(out.count), false)) }
            if inLength > 0 { buffers.append((b.buffer([], length: inLength), UInt32(inLength), true)) }
            buffers.append((b.buffer([0xFF]), 1, true))
            b.chain(0, buffers)
            return DeviceScript.header(config: 4 | 8 | 16) + b.image
        }
        return [request(VirtioBlock.RequestType.read, sector: 1, inLength: 1024),
                request(VirtioBlock.RequestType.write, sector: 2, out: [UInt8](repeating: 7, count: 512)),
                request(VirtioBlock.RequestType.flush, sector: 0),
                request(VirtioBlock.RequestType.getID, sector: 0, inLength: 20)]
    }
}

/// virtio-rng: every writable buffer the guest offers is filled (from a counter, not getrandom,
/// to keep runs fast and reproducible).
enum RNGFuzz {
    static func run(_ bytes: [UInt8]) {
        let script = DeviceScript(bytes)
        let filled = FilledBytes()
        let device = VirtioRNG(fill: { (buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) in
            precondition(GuestImage.memory.regions.contains { (region: GuestMemory.Region) in
                let start = UInt(bitPattern: region.hostAddress), end = start + UInt(region.size)
                let p = UInt(bitPattern: buffer.baseAddress)
                return p >= start && p + UInt(buffer.count) <= end
            }, "virtio-rng filled memory outside the guest's")
            filled.count.add(buffer.count, ordering: .relaxed)
            if !buffer.isEmpty { buffer[0] = 0xA5 }
        })
        script.drive(device, maximumSize: VirtioRNG.queueSize)
        // The cap on one request (VirtioRNG.maximumBytesPerRequest) is checked by
        // VirtioRNGTests.aHugeChainGetsAtMostTheRequestCap; here each fill must stay in guest memory.
        _ = filled.count.load(ordering: .relaxed)
    }

    final class FilledBytes: Sendable {
        let count = Atomic<Int>(0)
    }

    static func seeds() throws -> [[UInt8]] {
        var b = GuestImageBuilder()
        b.chain(0, [(b.buffer([], length: 64), 64, true)])
        b.chain(0, [(b.buffer([], length: 16), 16, true), (b.buffer([], length: 48), 48, true)])
        return [DeviceScript.header(config: 4) + b.image, DeviceScript.header(config: 4 | 8, advances: [0, 2]) + b.image]
    }
}

/// virtio-balloon: page numbers on the inflate and deflate queues and free ranges on the
/// reporting queue, all from the guest; every range actually given back must be whole pages
/// inside guest memory, and the target and count stay what host and driver set.
enum BalloonFuzz {
    static func run(_ bytes: [UInt8]) {
        let script = DeviceScript(bytes)
        let device = VirtioBalloon(discard: { memory, address, length in
            let done = memory.discard(address, length: length)
            precondition(!done || (address.rawValue % 4096 == 0 && length % 4096 == 0 && memory.contains(address, length: length)),
                         "virtio-balloon gave back a range that is not whole pages of guest memory")
            return done
        })
        let queues = (0..<3).map { GuestImage.queue($0, config: script.config, maximumSize: VirtioBalloon.queueSizes[$0]) }
        let features = script.config & 32 != 0 ? VirtioFeature.version1 : device.offeredFeatures
        guard (try? device.activate(VirtioActivation(memory: GuestImage.memory, queues: queues, features: features,
                                                     interrupt: VirtioInterrupt(line: NullLine())))) != nil else { return }
        device.setTarget(pages: UInt32(script.config))
        for (round, advance) in script.advances.enumerated() {
            for queue in 0..<3 {
                GuestImage.advanceAvailable(queue, by: round == 0 ? 0 : advance)
                device.queueNotified(queue)
            }
        }
        precondition(device.targetPages == UInt32(script.config), "the guest changed the host's target")
        device.reset()
    }

    static func seeds() throws -> [[UInt8]] {
        func pfns(_ numbers: [UInt32]) -> [UInt8] { numbers.flatMap { LittleEndian.bytes(UInt64($0), 4) } }
        var b = GuestImageBuilder()
        b.chain(0, [(b.buffer(pfns([12, 13, 15, 0xFFFF_FFFF])), 16, false)])
        b.chain(1, [(b.buffer(pfns([12])), 4, false)])
        b.chain(2, [(0x8000, 0x4000, true), (0x3001, 0x1000, true), (0xF000, 0x1000, true)])
        return [DeviceScript.header(config: 4) + b.image, DeviceScript.header(config: 4 | 32) + b.image]
    }
}
