import Synchronization
import GuestMemory
import SwiftletSystem
import Virtio
import Devices

/// virtio-vsock: scripted transmit sequences. Input: a config byte for the three queues
/// (`GuestImage.queue`), a round count (up to 32), per round how many more chains the driver
/// publishes on the transmit and the receive queue, then the memory image. Each round notifies
/// the transmit queue; connection requests to any host port are accepted (socket pairs). After
/// every round the device's connections and pending control packets must stay bounded, and a
/// reset must close every connection.
enum VsockFuzz {
    static let maximumRounds = 32
    /// The control-queue cap the bounded-devices fix sets (Firecracker's).
    static let controlCap = VirtioVsock.maximumControlPackets

    /// Host ports that accept every connection; the peer ends are closed after each run.
    final class AcceptingPorts: VsockHostPorts {
        let peers = Mutex(OwnedFileDescriptors())
        func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
            guard let pair = try? UnixSocket.pair() else { return nil }
            let device = pair.first.release(), peer = pair.second.release()
            peers.withLock { $0.append(OwnedFileDescriptor(taking: peer)) }
            return device
        }
    }

    static let ports = AcceptingPorts()
    /// One device for every run (each has an event-loop thread); a reset returns it to its start.
    static let device = try! VirtioVsock(guestCID: 3, hostPorts: ports)

    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let config = input.byte()
        let rounds = Int(input.byte()) % maximumRounds + 1
        let advances = (0..<rounds).map { _ in (transmit: UInt16(input.byte()), receive: UInt16(input.byte())) }
        GuestImage.load(input.rest())
        let queues = (0..<3).map { GuestImage.queue($0, config: config, maximumSize: VirtioVsock.queueSize) }
        let activation = VirtioActivation(memory: GuestImage.memory, queues: queues, features: device.offeredFeatures,
                                          interrupt: VirtioInterrupt(line: NullLine()))
        guard (try? device.activate(activation)) != nil else { return }
        for (round, advance) in advances.enumerated() {
            if round > 0 {
                GuestImage.advanceAvailable(1, by: advance.transmit)
                GuestImage.advanceAvailable(0, by: advance.receive)
            }
            device.queueNotified(1)
            let counts = device.queuedCounts
            precondition(counts.connections <= VirtioVsock.maximumConnections, "vsock connections exceed their cap")
            precondition(counts.control <= controlCap, "vsock control queue exceeds \(controlCap) packets")
        }
        device.reset()
        precondition(device.queuedCounts == (0, 0), "a reset vsock device kept connections or control packets")
        ports.peers.withLock { $0 = OwnedFileDescriptors() }
    }

    static func packet(_ operation: VsockHeader.Operation, port: UInt32 = 1024, payload: [UInt8] = [], flags: UInt32 = 0) -> VsockHeader {
        VsockHeader(sourceCID: 3, destinationCID: VsockHeader.hostCID, sourcePort: 5000, destinationPort: port,
                    length: UInt32(payload.count), operation: operation, flags: flags, bufferAllocation: 1 << 16)
    }

    static func seeds() throws -> [[UInt8]] {
        func script(_ packets: [(VsockHeader, [UInt8])], receiveBuffers: Int, rounds: [(UInt8, UInt8)] = []) -> [UInt8] {
            var b = GuestImageBuilder()
            for _ in 0..<receiveBuffers { b.chain(0, [(b.buffer([], length: 256), 256, true)]) }
            for (header, payload) in packets {
                var buffers = [(b.buffer(header.bytes), UInt32(VsockHeader.size), false)]
                if !payload.isEmpty { buffers.append((b.buffer(payload), UInt32(payload.count), false)) }
                b.chain(1, buffers)
            }
            return [4, UInt8(rounds.count), 0, 0] + rounds.flatMap { [$0.0, $0.1] } + b.image
        }
        let hello = Array("hello".utf8)
        return [
            script([(packet(.request), []), (packet(.readWrite, payload: hello), hello), (packet(.shutdown, flags: 3), [])], receiveBuffers: 4),
            script([(packet(.request), []), (packet(.creditRequest), []), (packet(.reset), [])], receiveBuffers: 2),
            // Packets the device answers with RST, and no receive buffers: control packets pile up.
            script([(packet(.readWrite, port: 7), []), (packet(.response), [])], receiveBuffers: 0, rounds: [(2, 0), (2, 0), (2, 0)]),
        ]
    }
}
