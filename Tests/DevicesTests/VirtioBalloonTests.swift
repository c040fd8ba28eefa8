import GuestMemory
import Synchronization
import SwiftletSystem
import TestSupport
import Testing
import Virtio
@testable import Devices

@Suite struct VirtioBalloonTests {
    /// 8 MiB of guest memory: the three queues' rings and buffers below 4 MiB, the pages the
    /// guest hands over above.
    let memory = try! GuestMemory(anonymous: [(GuestAddress(0), 8 << 20)])
    static let bases = [GuestAddress(0x10000), GuestAddress(0x140000), GuestAddress(0x280000)]

    struct Guest {
        var inflate: VirtqueueDriver
        var deflate: VirtqueueDriver
        var reporting: VirtqueueDriver
        let line: CountingLine
        let interrupt: VirtioInterrupt
    }

    func activate(_ device: VirtioBalloon, features: UInt64? = nil) throws -> Guest {
        let drivers = Self.bases.map { VirtqueueDriver(memory: memory, base: $0) }
        let line = CountingLine()
        let interrupt = VirtioInterrupt(line: line)
        let guest = Guest(inflate: drivers[0], deflate: drivers[1], reporting: drivers[2], line: line, interrupt: interrupt)
        try device.activate(VirtioActivation(memory: memory, queues: drivers.map { $0.queue() },
                                             features: features ?? device.offeredFeatures, interrupt: interrupt))
        return guest
    }

    /// Fills `pages` 4 KiB pages from `first` with `value`.
    func fill(page first: UInt64, count: UInt64, with value: UInt8) throws {
        try memory.write([UInt8](repeating: value, count: Int(count * 4096)), at: GuestAddress(first * 4096))
    }

    func page(_ number: UInt64) throws -> [UInt8] { try memory.read(count: 4096, at: GuestAddress(number * 4096)) }

    static func pfns(_ numbers: [UInt32]) -> [UInt8] { numbers.flatMap { LittleEndian.bytes(UInt64($0), 4) } }

    @Test func offersVersion1PageReportingAndDeflateOnOOM() {
        let device = VirtioBalloon()
        #expect(device.deviceType == .balloon)
        #expect(device.offeredFeatures & VirtioFeature.version1 != 0)
        #expect(device.offeredFeatures & VirtioBalloon.Feature.pageReporting != 0)
        #expect(device.offeredFeatures & VirtioBalloon.Feature.deflateOnOOM != 0)
        #expect(device.offeredFeatures & VirtioBalloon.Feature.statisticsQueue == 0, "the reporting queue is the third only without statistics")
        #expect(device.queueMaximumSizes.count == 3 && device.queueMaximumSizes[2] >= 32, "Linux needs 32 reporting entries")
    }

    @Test func inflatedPagesAreGivenBackAndReadAsZeros() throws {
        let device = VirtioBalloon()
        var guest = try activate(device)
        try fill(page: 1024, count: 4, with: 0xAB)
        let list = try guest.inflate.buffer(16, bytes: Self.pfns([1024, 1025, 1027, 2047]))
        try guest.inflate.publish(try guest.inflate.chain([(list, 16, false)]))
        device.queueNotified(VirtioBalloon.inflateQueue)
        #expect(try guest.inflate.used(0) == (0, 0))
        #expect(try page(1024) == [UInt8](repeating: 0, count: 4096))
        #expect(try page(1025) == [UInt8](repeating: 0, count: 4096))
        #expect(try page(1026) == [UInt8](repeating: 0xAB, count: 4096), "a page not in the list is kept")
        #expect(try page(1027) == [UInt8](repeating: 0, count: 4096))
        #expect(device.counters.pagesInflated == 4)
        #expect(guest.line.raised.load(ordering: .relaxed) == 1)
    }

    @Test func neighbouringPagesAreGivenBackAsOneRange() throws {
        let calls = Mutex<[(UInt64, UInt64)]>([])
        let device = VirtioBalloon(discard: { _, address, length in
            calls.withLock { $0.append((address.rawValue, length)) }
            return true
        })
        var guest = try activate(device)
        let list = try guest.inflate.buffer(20, bytes: Self.pfns([1024, 1025, 1026, 1500, 1501]))
        try guest.inflate.publish(try guest.inflate.chain([(list, 20, false)]))
        device.queueNotified(VirtioBalloon.inflateQueue)
        let ranges = calls.withLock { $0 }
        #expect(ranges.count == 2)
        #expect(ranges.first.map { $0 == (1024 * 4096, 3 * 4096) } == true)
        #expect(ranges.last.map { $0 == (1500 * 4096, 2 * 4096) } == true)
    }

    @Test func pagesOutsideGuestMemoryAreSkippedAndCounted() throws {
        let device = VirtioBalloon()
        var guest = try activate(device)
        try fill(page: 1030, count: 1, with: 0x11)
        let list = try guest.inflate.buffer(12, bytes: Self.pfns([UInt32.max, 2048, 1030]))
        try guest.inflate.publish(try guest.inflate.chain([(list, 12, false)]))
        device.queueNotified(VirtioBalloon.inflateQueue)
        #expect(try guest.inflate.used(0) == (0, 0))
        #expect(device.counters.rejected == 2)
        #expect(device.counters.pagesInflated == 1)
        #expect(try page(1030) == [UInt8](repeating: 0, count: 4096))
    }

    @Test func deflateCountsAndTouchesNothing() throws {
        let device = VirtioBalloon()
        var guest = try activate(device)
        try fill(page: 1100, count: 1, with: 0x22)
        let list = try guest.deflate.buffer(4, bytes: Self.pfns([1100]))
        try guest.deflate.publish(try guest.deflate.chain([(list, 4, false)]))
        device.queueNotified(VirtioBalloon.deflateQueue)
        #expect(try guest.deflate.used(0) == (0, 0))
        #expect(device.counters.pagesDeflated == 1)
        #expect(try page(1100) == [UInt8](repeating: 0x22, count: 4096))
    }

    @Test func reportedFreeRangesAreGivenBack() throws {
        let device = VirtioBalloon()
        var guest = try activate(device)
        try fill(page: 1536, count: 512, with: 0x33) // 2 MiB at 6 MiB
        try fill(page: 1200, count: 1, with: 0x44)
        try guest.reporting.publish(try guest.reporting.chain([
            (GuestAddress(1536 * 4096), 2 << 20, true),
            (GuestAddress(1200 * 4096 + 1), 4096, true), // not page-aligned: refused
            (GuestAddress(1300 * 4096), 100, true),      // not whole pages: refused
        ]))
        device.queueNotified(VirtioBalloon.reportingQueue)
        #expect(try guest.reporting.used(0) == (0, 0))
        #expect(try page(1536) == [UInt8](repeating: 0, count: 4096))
        #expect(try page(2047) == [UInt8](repeating: 0, count: 4096))
        #expect(try page(1200) == [UInt8](repeating: 0x44, count: 4096))
        #expect(device.counters.bytesReported == 2 << 20)
        #expect(device.counters.rejected == 2)
    }

    @Test func aReportOutsideGuestMemoryStopsTheQueue() throws {
        let log = WarningLog()
        let device = VirtioBalloon(onError: { e in log.withLock { $0.append(e.description) } })
        var guest = try activate(device)
        try fill(page: 1536, count: 1, with: 0x55)
        try guest.reporting.publish(try guest.reporting.chain([(GuestAddress(7 << 20), 4 << 20, true)]))
        device.queueNotified(VirtioBalloon.reportingQueue)
        try guest.reporting.publish(try guest.reporting.chain([(GuestAddress(1536 * 4096), 4096, true)]))
        device.queueNotified(VirtioBalloon.reportingQueue)
        #expect(try guest.reporting.usedIndex == 0)
        #expect(log.withLock { $0 }.contains { $0.contains("outside guest memory") })
        #expect(try page(1536) == [UInt8](repeating: 0x55, count: 4096), "nothing is served until the driver resets the device")
        #expect(device.counters.bytesReported == 0)
    }

    @Test func theReportingQueueIsServedOnlyWhenNegotiated() throws {
        let device = VirtioBalloon()
        var guest = try activate(device, features: VirtioFeature.version1)
        try guest.reporting.publish(try guest.reporting.chain([(GuestAddress(6 << 20), 4096, true)]))
        device.queueNotified(VirtioBalloon.reportingQueue)
        #expect(try guest.reporting.usedIndex == 0)
        #expect(device.servedQueues?.count == 3)
        #expect(device.servedQueues?[2] == nil)
    }

    @Test func aTargetChangeIsAConfigurationChange() throws {
        let device = VirtioBalloon()
        device.setTarget(pages: 5) // before activation: no interrupt, but the value is there
        let guest = try activate(device)
        let generation = device.configurationGeneration
        device.setTarget(pages: 256)
        #expect(device.configurationGeneration != generation)
        #expect(guest.interrupt.status & VirtioInterrupt.configurationChange != 0)
        var bytes = [UInt8](repeating: 0xFF, count: 8)
        bytes.withUnsafeMutableBytes { device.readConfiguration(offset: 0, into: $0) }
        #expect(LittleEndian.read(bytes, at: 0, count: 4) == 256)
        #expect(LittleEndian.read(bytes, at: 4, count: 4) == 0)
        let raised = guest.line.raised.load(ordering: .relaxed)
        device.setTarget(pages: 256)
        #expect(guest.line.raised.load(ordering: .relaxed) == raised, "an unchanged target is not news")
    }

    @Test func theDriverWritesOnlyActual() {
        let device = VirtioBalloon()
        let actual = LittleEndian.bytes(200, 4)
        actual.withUnsafeBytes { device.writeConfiguration(offset: 4, data: $0) }
        LittleEndian.bytes(9, 4).withUnsafeBytes { device.writeConfiguration(offset: 0, data: $0) } // num_pages is the host's
        [UInt8(1)].withUnsafeBytes { device.writeConfiguration(offset: 5, data: $0) }                  // a partial write is ignored
        #expect(device.actualPages == 200)
        #expect(device.targetPages == 0)
        var tail = [UInt8](repeating: 0xFF, count: 12)
        tail.withUnsafeMutableBytes { device.readConfiguration(offset: 8, into: $0) }
        #expect(tail == [UInt8](repeating: 0, count: 12), "hint id, poison value and what lies beyond read as zeros")
    }

    @Test func targetAndActualSurviveASnapshot() throws {
        let device = VirtioBalloon()
        device.setTarget(pages: 1000)
        LittleEndian.bytes(640, 4).withUnsafeBytes { device.writeConfiguration(offset: 4, data: $0) }
        let saved = try #require(device.savedConfiguration)
        let restored = VirtioBalloon()
        try restored.restoreConfiguration(saved)
        #expect(restored.targetPages == 1000 && restored.actualPages == 640)
        #expect(throws: SwiftletError.self) { try restored.restoreConfiguration([1, 2, 3]) }
    }

    @Test func aHugeRequestIsBounded() throws {
        let calls = Atomic<Int>(0)
        let device = VirtioBalloon(discard: { _, _, _ in calls.add(1, ordering: .relaxed); return true })
        var guest = try activate(device)
        // 15 descriptors of the same 64 KiB of page numbers that never run together: the device
        // reads at most `maximumPagesPerRequest` of them.
        let numbers = (0..<16384).map { UInt32($0 * 2) }
        let list = try guest.inflate.buffer(65536, bytes: Self.pfns(numbers))
        try guest.inflate.publish(try guest.inflate.chain(Array(repeating: (list, 65536, false), count: 15)))
        device.queueNotified(VirtioBalloon.inflateQueue)
        #expect(calls.load(ordering: .relaxed) == Int(VirtioBalloon.maximumPagesPerRequest))
    }

    @Test func discardGivesAnonymousMemoryBackAndRefusesMisalignedRanges() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        try memory.write([UInt8](repeating: 7, count: 2 << 20), at: GuestAddress(2 << 20))
        let before = memory.residentBytes
        #expect(memory.discard(GuestAddress(2 << 20), length: 2 << 20))
        #expect(memory.residentBytes <= before - (2 << 20))
        #expect(try memory.read(count: 16, at: GuestAddress(3 << 20)) == [UInt8](repeating: 0, count: 16))
        #expect(!memory.discard(GuestAddress(100), length: 4096))
        #expect(!memory.discard(GuestAddress(0), length: 100))
        #expect(!memory.discard(GuestAddress(4 << 20), length: 4096))
        #expect(!memory.discard(GuestAddress(0), length: 0))
    }
}
