import Glibc
import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

/// Bulk transfer both ways through the device and a socket pair: every frame arrives, and the
/// rate is printed (frames per second; nothing is asserted about time). 1000 frames per case,
/// 20000 with SWIFTLET_MEASURE_NET=1 for a figure worth reading:
/// `SWIFTLET_MEASURE_NET=1 swift test --skip-build --filter VirtioNetMeasure`.
@Suite(.serialized)
struct VirtioNetMeasureTests {
    static let frames = getenv("SWIFTLET_MEASURE_NET") != nil ? 20_000 : 1000

    final class Counter: Sendable {
        let value: Atomic<Int>
        init(_ value: Int) { self.value = Atomic(value) }
    }

    static func report(_ what: String, frames: Int, bytes: Int, seconds: Double) {
        let rate = Int(Double(frames) / seconds)
        let centigigabits = Int(Double(bytes) * 8 / seconds / 1e7)
        print("virtio-net \(what): \(rate) frames/s, \(centigigabits / 100).\(centigigabits % 100 < 10 ? "0" : "")\(centigigabits % 100) Gbit/s")
    }

    @Test(arguments: [1514, 65534])
    func transmit(frameSize: Int) throws {
        let guest = try NetGuest()
        let frame = numberedFrame(frameSize)
        let address = try guest.tx.buffer(12 + frameSize, bytes: [UInt8](repeating: 0, count: 12) + frame)
        let peer = guest.peer
        let total = Self.frames
        // passt's part: read every byte the device sends.
        let left = Counter(total * (4 + frameSize))
        let reader = try OSThread.start(name: "reader") {
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while left.value.load(ordering: .relaxed) > 0 {
                let want = min(buffer.count, left.value.load(ordering: .relaxed))
                let n = buffer.withUnsafeMutableBytes { Glibc.read(peer, $0.baseAddress, want) }
                if n <= 0 { break }
                left.value.subtract(n, ordering: .relaxed)
            }
        }
        let start = MonotonicClock.now
        var published = 0
        // The driver keeps up to 128 frames in the ring and notifies once per batch, as Linux's xmit_more does.
        while published < total {
            let done = Int(try guest.tx.usedIndex)
            let inFlight = (published - done + 65536) % 65536
            let batch = min(128 - inFlight, total - published)
            if batch <= 0 { usleep(50); continue }
            for _ in 0..<batch { try guest.tx.publish(try guest.tx.chain([(address, UInt32(12 + frameSize), false)])) }
            published += batch
            guest.device.queueNotified(1)
        }
        reader.join()
        let seconds = Double(MonotonicClock.now - start) / 1e9
        #expect(left.value.load(ordering: .relaxed) == 0, "every byte of every frame reached the socket")
        #expect(guest.device.statistics.transmittedFrames == total)
        Self.report("transmit, \(frameSize)-byte frames", frames: total, bytes: total * frameSize, seconds: seconds)
    }

    @Test(arguments: [1514, 65534])
    func receive(frameSize: Int) throws {
        let bufferSize: UInt32 = 4096
        let guest = try NetGuest(receiveBuffers: 256, bufferSize: bufferSize)
        let peer = guest.peer
        let total = Self.frames
        let writer = try OSThread.start(name: "writer") {
            let one = NetGuest.prefix(frameSize) + numberedFrame(frameSize)
            var batch: [UInt8] = []
            for _ in 0..<max(1, (256 << 10) / one.count) { batch += one }
            let perBatch = batch.count / one.count
            var sent = 0
            while sent < total {
                let count = min(perBatch, total - sent)
                writeAll(peer, Array(batch[0..<count * one.count]))
                sent += count
            }
        }
        let start = MonotonicClock.now
        var received = 0
        while received < total {
            var returned = 0
            while try guest.rx.usedIndex != guest.consumed {
                let (head, _) = try guest.rx.used(guest.consumed)
                guest.consumed &+= 1
                try guest.rx.publish(head) // the same chain goes back, as a driver refills
                returned += 1
            }
            received = guest.device.statistics.receivedFrames
            if returned > 0 { guest.device.queueNotified(0) } else { usleep(20) }
        }
        writer.join()
        #expect(guest.device.statistics.receivedFrames == total)
        let seconds = Double(MonotonicClock.now - start) / 1e9
        Self.report("receive, \(frameSize)-byte frames over \(bufferSize)-byte buffers", frames: total, bytes: total * frameSize, seconds: seconds)
    }
}
