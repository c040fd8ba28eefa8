import Glibc
import GuestMemory
import SwiftletNet
import SwiftletSystem
import Virtio
@testable import Devices

/// virtio-net: scripted transmit and receive chains over fuzzed guest memory, with fuzzed bytes
/// from passt's side of the socket. Input: a config byte (bits 0-4: `GuestImage.queue` for both
/// queues; bit 5: no MRG_RXBUF; bit 6: no GUEST_CSUM; bit 7: a filter that drops, answers and
/// passes by the frame's first byte), an MTU selector, a round count (up to 8), per round the
/// transmit and receive available-index advances and how many socket bytes arrive, then the
/// socket bytes, then the memory image. Each round writes its socket bytes, notifies both queues
/// and serves the device on this thread (it runs no thread of its own here). After every round
/// what the device holds stays within its bounds, and every frame it sent is whole and within
/// the MTU; after a reset it holds no chains and no replies.
enum VirtioNetFuzz {
    static let maximumRounds = 8
    static let mtus: [UInt16] = [VirtioNet.defaultMTU, 1500, VirtioNet.minimumMTU, 9000]

    /// Drops, answers or passes by the frame's first byte (outbound); drops inbound frames whose
    /// first byte is odd. Replies include one larger than any MTU (the device must drop it).
    final class ByteFilter: FrameFilter {
        func outbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
            guard let first = frame.first else { return .drop }
            switch first & 3 {
            case 0: return .pass
            case 1: return .drop
            case 2: return .reply([Array(frame.prefix(64)), Array(frame.prefix(8))])
            default: return .reply([[UInt8](repeating: first, count: 70_000)])
            }
        }
        func inbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
            (frame.first ?? 0) & 1 == 1 ? .drop : .pass
        }
    }

    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let config = input.byte()
        let mtu = mtus[Int(input.byte() & 3)]
        let rounds = Int(input.byte()) % maximumRounds + 1
        let script = (0..<rounds).map { _ in
            (transmit: UInt16(input.byte()), receive: UInt16(input.byte()), socket: Int(input.integer(UInt16.self)) % 4096)
        }
        let socketChunks = script.map { input.take($0.socket) }
        GuestImage.load(input.rest())

        guard let pair = try? UnixSocket.pair() else { return }
        let peer = pair.second
        try? OwnedFileDescriptor.setNonBlocking(fd: peer.rawValue)
        guard let device = try? VirtioNet(mac: try! MACAddress([2, 0x53, 0x57, 0, 0, 1]), mtu: mtu, backend: pair.first,
                                          filter: config & 0x80 != 0 ? ByteFilter() : nil, startsThread: false, onError: { _ in }) else { return }
        defer { device.stop() }
        var features = device.offeredFeatures
        if config & 0x20 != 0 { features &= ~VirtioNetFeature.mergeableReceiveBuffers }
        if config & 0x40 != 0 { features &= ~VirtioNetFeature.guestChecksum }
        let queueConfig = config & 0x1F
        let queues = (0..<2).map { GuestImage.queue($0, config: queueConfig, maximumSize: VirtioNet.queueSize) }
        let activation = VirtioActivation(memory: GuestImage.memory, queues: queues, features: features,
                                          interrupt: VirtioInterrupt(line: NullLine()))
        guard (try? device.activate(activation)) != nil else { return }
        var stream = SentFrames(maximumFrame: Int(mtu) + VirtioNet.ethernetHeaderSize)
        for (round, step) in script.enumerated() {
            if round > 0 {
                GuestImage.advanceAvailable(1, by: step.transmit)
                GuestImage.advanceAvailable(0, by: step.receive)
            }
            let chunk = socketChunks[round]
            if !chunk.isEmpty { _ = chunk.withUnsafeBytes { UnixSocket.sendSome(peer.rawValue, $0) } }
            device.queueNotified(1)
            device.queueNotified(0)
            device.service()
            let held = device.heldCounts
            precondition(held.transmitBytes <= VirtioNet.transmitBufferSize, "virtio-net holds more transmit bytes than its bound")
            precondition(held.receiveBytes <= VirtioNet.receiveBufferSize, "virtio-net holds more received bytes than its bound")
            precondition(held.replies <= VirtioNet.maximumPendingReplies, "virtio-net holds more filter replies than its bound")
            precondition(held.receiveChains <= Int(GuestImage.maximumQueueSize), "virtio-net holds more receive chains than the ring has")
            stream.drain(peer.rawValue)
        }
        device.reset()
        let held = device.heldCounts
        precondition(held.replies == 0 && held.receiveChains == 0, "a reset virtio-net device kept chains or replies")
    }

    /// What the device sent on the socket, checked frame by frame: every length within 14 bytes
    /// (an Ethernet header) and the MTU's frame.
    struct SentFrames {
        let maximumFrame: Int
        var pending: [UInt8] = []

        mutating func drain(_ fd: Int32) {
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while case .moved(let n) = buffer.withUnsafeMutableBytes({ OwnedFileDescriptor.readSome(fd: fd, into: $0) }), n > 0 {
                pending += buffer[0..<n]
            }
            while pending.count >= 4 {
                let length = Int(pending[0]) << 24 | Int(pending[1]) << 16 | Int(pending[2]) << 8 | Int(pending[3])
                precondition(length >= VirtioNet.ethernetHeaderSize && length <= maximumFrame,
                             "virtio-net sent a frame of \(length) bytes (the MTU allows \(maximumFrame))")
                guard pending.count >= 4 + length else { break }
                pending.removeFirst(4 + length)
            }
        }
    }

    static func seeds() throws -> [[UInt8]] {
        func script(config: UInt8, mtu: UInt8 = 0, transmit: [([UInt8], [UInt8])], receive: [UInt32], splitReceive: Bool = false,
                    socket: [[UInt8]], rounds: [(UInt8, UInt8)] = []) -> [UInt8] {
            var b = GuestImageBuilder()
            for size in receive {
                if splitReceive {
                    b.chain(0, [(b.buffer([], length: 12), 12, true), (b.buffer([], length: Int(size) - 12), size - 12, true)])
                } else {
                    b.chain(0, [(b.buffer([], length: Int(size)), size, true)])
                }
            }
            for (header, frame) in transmit {
                b.chain(1, [(b.buffer(header), UInt32(header.count), false), (b.buffer(frame), UInt32(frame.count), false)])
            }
            var bytes: [UInt8] = []
            for frame in socket {
                bytes += Array(littleEndian(UInt32(frame.count)).reversed()) // big-endian
                bytes += frame
            }
            let allRounds = [(UInt8(0), UInt8(0))] + rounds
            var header: [UInt8] = [config, mtu, UInt8(allRounds.count - 1)]
            for (i, round) in allRounds.enumerated() {
                header += [round.0, round.1] + littleEndian(UInt16(i == 0 ? bytes.count : 0))
            }
            return header + bytes + b.image
        }
        func frame(_ length: Int, first: UInt8 = 0x02) -> [UInt8] {
            [first] + (1..<length).map { UInt8(truncatingIfNeeded: $0) }
        }
        let plain = [UInt8](repeating: 0, count: 12)
        var partial = plain
        partial[0] = 1; partial[6] = 34; partial[8] = 16 // NEEDS_CSUM, TCP over IPv4
        return [
            // Mergeable buffers, frames both ways.
            script(config: 4 | 8, transmit: [(plain, frame(60)), (plain, frame(300))], receive: [256, 256, 256, 256],
                   socket: [frame(60), frame(600)]),
            // No MRG_RXBUF, header and data in separate receive descriptors, a 1500-byte MTU.
            script(config: 4 | 0x20 | 0x40, mtu: 1, transmit: [(plain, frame(200))], receive: [1526], splitReceive: true,
                   socket: [frame(1515), frame(100)]),
            // A partial checksum and the filter's verdicts.
            script(config: 4 | 8 | 0x80, transmit: [(partial, frame(80)), (plain, frame(60, first: 1)), (plain, frame(60, first: 2)),
                                                    (plain, frame(60, first: 3))],
                   receive: [256, 256, 256, 256], socket: [frame(60, first: 1), frame(60)]),
            // No receive buffers, then a broken length prefix.
            script(config: 4, transmit: [], receive: [], socket: [frame(60), []], rounds: [(0, 0)]),
        ]
    }
}
