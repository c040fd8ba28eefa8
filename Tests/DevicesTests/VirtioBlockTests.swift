import Glibc
import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

final class CountingLine: InterruptLine {
    let raised = Atomic<Int>(0)
    func setLevel(_ asserted: Bool) { if asserted { raised.add(1, ordering: .relaxed) } }
}

/// A backend whose every operation fails, as a dying disk would.
final class FailingBackend: BlockBackend {
    var byteCount: UInt64 { 1 << 20 }
    func read(into destination: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        throw SwiftletError(.systemCall, "read failed", cause: .ioError)
    }
    func write(from source: UnsafeRawBufferPointer, at offset: UInt64) throws(SwiftletError) {
        throw SwiftletError(.systemCall, "write failed", cause: .ioError)
    }
    func flush() throws(SwiftletError) { throw SwiftletError(.systemCall, "flush failed", cause: .ioError) }
}

final class WarningLog: Sendable {
    let list = Mutex<[String]>([])
    func withLock<R>(_ body: (inout [String]) -> R) -> R { list.withLock { body(&$0) } }
}

/// A virtio-blk device on a queue driven from the test, as Linux's virtio_blk would drive it.
struct BlockHarness {
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 8 << 20)])
    var driver: VirtqueueDriver
    let device: VirtioBlock
    let line = CountingLine()
    let warnings = WarningLog()

    init(backend: any BlockBackend, readOnly: Bool = false) throws {
        driver = VirtqueueDriver(memory: memory, size: 64)
        let warnings = self.warnings
        device = VirtioBlock(backend: backend, readOnly: readOnly, identifier: "test-disk",
                             onError: { error in warnings.withLock { $0.append(error.description) } })
        try device.activate(VirtioActivation(memory: memory, queues: [driver.queue(indirect: true)],
                                             features: device.offeredFeatures, interrupt: VirtioInterrupt(line: line)))
    }

    /// Sends one request; returns (status, used length, data the device wrote).
    mutating func request(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0,
                          splitHeader: Bool = false) throws -> (status: UInt8, used: UInt32, data: [UInt8]) {
        var header = [UInt8](repeating: 0, count: 16)
        for i in 0..<4 { header[i] = UInt8(truncatingIfNeeded: type >> (8 * UInt32(i))) }
        for i in 0..<8 { header[8 + i] = UInt8(truncatingIfNeeded: sector >> (8 * UInt64(i))) }
        var buffers: [(GuestAddress, UInt32, Bool)] = []
        if splitHeader {
            buffers.append((try driver.buffer(10, bytes: Array(header[0..<10])), 10, false))
            buffers.append((try driver.buffer(6, bytes: Array(header[10...])), 6, false))
        } else {
            buffers.append((try driver.buffer(16, bytes: header), 16, false))
        }
        if !out.isEmpty { buffers.append((try driver.buffer(out.count, bytes: out), UInt32(out.count), false)) }
        let data = inLength > 0 ? try driver.buffer(inLength) : GuestAddress(0)
        if inLength > 0 { buffers.append((data, UInt32(inLength), true)) }
        let status = try driver.buffer(1, bytes: [0xEE])
        buffers.append((status, 1, true))
        let before = try driver.usedIndex
        try driver.publish(try driver.chain(buffers))
        device.queueNotified(0)
        #expect(try driver.usedIndex == before &+ 1, "the device must return every request")
        let used = try driver.used(before)
        return (try memory.read(UInt8.self, at: status), used.length,
                inLength > 0 ? try memory.read(count: inLength, at: data) : [])
    }
}

@Suite struct VirtioBlockTests {
    let directory = TemporaryDirectory()
    let content = (0..<(64 * 512)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }

    func image() -> String { directory.write("disk.img", content) }

    func fileBytes(_ path: String) -> [UInt8] {
        (try? OwnedFileDescriptor.readSmallFile(path)) ?? []
    }

    @Test func advertisesCapacityAndFeatures() throws {
        let h = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: true), readOnly: true)
        var config = [UInt8](repeating: 0, count: 8)
        config.withUnsafeMutableBytes { h.device.readConfiguration(offset: 0, into: $0) }
        #expect(config == [64, 0, 0, 0, 0, 0, 0, 0])
        #expect(h.device.offeredFeatures & VirtioBlock.Feature.readOnly != 0)
        #expect(h.device.offeredFeatures & VirtioFeature.version1 != 0)
        let rw = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: false))
        #expect(rw.device.offeredFeatures & VirtioBlock.Feature.readOnly == 0)
    }

    @Test func anEmptyDriveTakesOneDiskAndShowsItsCapacity() throws {
        var h = try BlockHarness(backend: EmptyBlockBackend(), readOnly: true)
        func capacity() -> [UInt8] {
            var config = [UInt8](repeating: 0xFF, count: 8)
            config.withUnsafeMutableBytes { h.device.readConfiguration(offset: 0, into: $0) }
            return config
        }
        #expect(capacity() == [0, 0, 0, 0, 0, 0, 0, 0])
        #expect(h.device.isEmpty && h.device.configurationGeneration == 0)
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: 0, inLength: 512).status == VirtioBlock.Status.ioError)

        try h.device.insert(try FileBlockBackend(path: image(), readOnly: true))
        #expect(capacity() == [64, 0, 0, 0, 0, 0, 0, 0])
        #expect(!h.device.isEmpty && h.device.configurationGeneration == 1, "the driver can tell the configuration changed")
        let r = try h.request(type: VirtioBlock.RequestType.read, sector: 3, inLength: 512)
        #expect(r.status == VirtioBlock.Status.ok && r.data == Array(content[(3 * 512)..<(4 * 512)]))

        // The guest may have cached the first disk: it is never swapped for another.
        let other = directory.write("other.img", [UInt8](repeating: 9, count: 4096))
        let error = #expect(throws: SwiftletError.self) { try h.device.insert(try FileBlockBackend(path: other, readOnly: true)) }
        #expect(error?.message.contains("only an empty drive") == true)
        #expect(capacity() == [64, 0, 0, 0, 0, 0, 0, 0] && h.device.configurationGeneration == 1)
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: 3, inLength: 512).data == Array(content[(3 * 512)..<(4 * 512)]))
    }

    @Test func readsSectorsIntoGuestMemory() throws {
        var h = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: true), readOnly: true)
        let r = try h.request(type: VirtioBlock.RequestType.read, sector: 3, inLength: 1024)
        #expect(r.status == VirtioBlock.Status.ok)
        #expect(r.used == 1025)
        #expect(r.data == Array(content[(3 * 512)..<(5 * 512)]))
        #expect(h.line.raised.load(ordering: .relaxed) == 1)
        let split = try h.request(type: VirtioBlock.RequestType.read, sector: 63, inLength: 512, splitHeader: true)
        #expect(split.status == VirtioBlock.Status.ok && split.data == Array(content[(63 * 512)...]))
    }

    @Test func writesReachTheFileAndFlushSucceeds() throws {
        let path = image()
        var h = try BlockHarness(backend: try FileBlockBackend(path: path, readOnly: false))
        let data = [UInt8](repeating: 0x5A, count: 512)
        let w = try h.request(type: VirtioBlock.RequestType.write, sector: 10, out: data)
        #expect(w.status == VirtioBlock.Status.ok && w.used == 1)
        #expect(try h.request(type: VirtioBlock.RequestType.flush, sector: 0).status == VirtioBlock.Status.ok)
        var expected = content
        expected.replaceSubrange((10 * 512)..<(11 * 512), with: data)
        #expect(fileBytes(path) == expected)
    }

    @Test func aReadOnlyDiskRefusesWritesAndStaysIntact() throws {
        let path = image()
        var h = try BlockHarness(backend: try FileBlockBackend(path: path, readOnly: true), readOnly: true)
        let w = try h.request(type: VirtioBlock.RequestType.write, sector: 0, out: [UInt8](repeating: 1, count: 512))
        #expect(w.status == VirtioBlock.Status.ioError)
        #expect(fileBytes(path) == content)
    }

    @Test func outOfRangeAndMisalignedRequestsFail() throws {
        let path = image()
        var h = try BlockHarness(backend: try FileBlockBackend(path: path, readOnly: false))
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: 64, inLength: 512).status == VirtioBlock.Status.ioError)
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: 63, inLength: 1024).status == VirtioBlock.Status.ioError)
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: UInt64.max, inLength: 512).status == VirtioBlock.Status.ioError)
        #expect(try h.request(type: VirtioBlock.RequestType.write, sector: 0, out: [1, 2, 3]).status == VirtioBlock.Status.ioError)
        #expect(fileBytes(path) == content)
    }

    @Test func reportsTheIdentifierAndRefusesUnknownRequests() throws {
        var h = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: true), readOnly: true)
        let id = try h.request(type: VirtioBlock.RequestType.getID, sector: 0, inLength: 20)
        #expect(id.status == VirtioBlock.Status.ok)
        #expect(id.data == Array("test-disk".utf8) + [UInt8](repeating: 0, count: 11))
        #expect(try h.request(type: 11 /* discard, not offered */, sector: 0).status == VirtioBlock.Status.unsupported)
    }

    @Test func hostIOFailuresBecomeIOErrors() throws {
        var h = try BlockHarness(backend: FailingBackend())
        #expect(try h.request(type: VirtioBlock.RequestType.read, sector: 0, inLength: 512).status == VirtioBlock.Status.ioError)
        #expect(try h.request(type: VirtioBlock.RequestType.write, sector: 0, out: [UInt8](repeating: 0, count: 512)).status == VirtioBlock.Status.ioError)
        #expect(try h.request(type: VirtioBlock.RequestType.flush, sector: 0).status == VirtioBlock.Status.ioError)
        #expect(h.warnings.withLock { $0.count } >= 2)
    }

    @Test func aFileThatShrankGivesIOErrorsNotGarbage() throws {
        let path = image()
        var h = try BlockHarness(backend: try FileBlockBackend(path: path, readOnly: true), readOnly: true)
        truncate(path, 512 * 8)
        let r = try h.request(type: VirtioBlock.RequestType.read, sector: 7, inLength: 1024)
        #expect(r.status == VirtioBlock.Status.ioError)
        #expect(r.used == 1)
    }

    @Test func aRequestWithoutAStatusByteIsReturnedEmpty() throws {
        var h = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: true), readOnly: true)
        let header = try h.driver.buffer(16)
        try h.driver.publish(try h.driver.chain([(header, 16, false)]))
        h.device.queueNotified(0)
        #expect(try h.driver.used(0) == (0, 0))
    }

    @Test func aBrokenRingStopsTheDeviceWithAWarning() throws {
        var h = try BlockHarness(backend: try FileBlockBackend(path: image(), readOnly: true), readOnly: true)
        try h.driver.publish(200) // head beyond the queue
        h.device.queueNotified(0)
        #expect(h.warnings.withLock { $0 }.contains { $0.contains("beyond the queue") })
        #expect(try h.driver.usedIndex == 0)
    }

    @Test func refusesFilesThatCannotBeDisks() throws {
        #expect(throws: SwiftletError.self) { try FileBlockBackend(path: directory.path + "/missing.img", readOnly: true) }
        #expect(throws: SwiftletError.self) { try FileBlockBackend(path: directory.path, readOnly: true) }
        let tiny = directory.write("tiny.img", [1, 2, 3])
        #expect(throws: SwiftletError.self) { try FileBlockBackend(path: tiny, readOnly: true) }
    }
}
