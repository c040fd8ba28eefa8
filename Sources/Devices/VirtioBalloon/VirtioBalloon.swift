import GuestMemory
import Synchronization
import SwiftletSystem
import Virtio

/// A virtio memory balloon (virtio 1.2, section 5.5) with free page reporting: the host sets a
/// target number of pages the guest is to hand over (inflate) or take back (deflate), and the
/// guest reports the free memory it has (2 MiB blocks in Linux); the pages it hands over or
/// reports are given back to the host at once (`GuestMemory.discard`), so a machine's host
/// memory follows what its guest uses. With DEFLATE_ON_OOM the guest takes pages back from the
/// balloon when it runs out of memory rather than failing.
///
/// Everything the guest sends is checked: page numbers and reported ranges outside guest memory
/// or not page-aligned are skipped (and counted), and a chain's work is bounded by its length.
public final class VirtioBalloon: VirtioDevice {
    /// Feature bits (virtio 1.2, section 5.5.3).
    public enum Feature {
        public static let mustTellHost: UInt64 = 1 << 0
        public static let statisticsQueue: UInt64 = 1 << 1
        public static let deflateOnOOM: UInt64 = 1 << 2
        public static let freePageHint: UInt64 = 1 << 3
        public static let pagePoison: UInt64 = 1 << 4
        public static let pageReporting: UInt64 = 1 << 5
    }
    /// The balloon's page size: page frame numbers are of 4 KiB pages, whatever the guest's own.
    public static let pageSize: UInt64 = 4096
    /// Queues: inflate, deflate, and (with page reporting, no statistics and no hinting offered)
    /// the reporting queue as the third. Linux needs 32 or more entries on the reporting queue.
    public static let queueSizes: [UInt16] = [256, 256, 64]
    static let inflateQueue = 0, deflateQueue = 1, reportingQueue = 2
    /// Page frame numbers one inflate or deflate chain may carry (Linux sends at most 256).
    public static let maximumPagesPerRequest: UInt64 = 4096

    /// What the device has done, for status and tests.
    public struct Counters: Sendable, Equatable {
        /// Pages handed over by inflating (discarded), and taken back by deflating.
        public var pagesInflated: UInt64 = 0
        public var pagesDeflated: UInt64 = 0
        /// Bytes of free memory the guest reported (and that were discarded), in all.
        public var bytesReported: UInt64 = 0
        /// Page numbers or ranges the guest sent that were outside its memory or misaligned.
        public var rejected: UInt64 = 0
    }

    struct Configuration: Equatable {
        /// num_pages: how many pages the host wants in the balloon.
        var targetPages: UInt32 = 0
        /// actual: how many the driver says it has in the balloon.
        var actualPages: UInt32 = 0
        var generation: UInt32 = 0
    }

    private let queues: [DeviceQueue]
    private let configuration = Mutex(Configuration())
    private let stats = Mutex(Counters())
    /// The activation's interrupt (a target change is a configuration change) and features.
    private let live = Mutex<(interrupt: VirtioInterrupt, features: UInt64)?>(nil)
    private let onError: @Sendable (SwiftletError) -> Void
    /// Gives pages back to the host (tests watch it); by default `GuestMemory.discard`.
    private let discard: @Sendable (GuestMemory, GuestAddress, UInt64) -> Bool

    public init(onError: @escaping @Sendable (SwiftletError) -> Void = { _ in },
                discard: @escaping @Sendable (GuestMemory, GuestAddress, UInt64) -> Bool = { $0.discard($1, length: $2) }) {
        self.onError = onError
        self.discard = discard
        queues = ["inflate", "deflate", "reporting"].map { DeviceQueue(name: "virtio-balloon \($0) queue", onError: onError) }
    }

    public var deviceType: VirtioDeviceType { .balloon }
    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | VirtioFeature.indirectDescriptors | Feature.deflateOnOOM | Feature.pageReporting
    }
    public var queueMaximumSizes: [UInt16] { Self.queueSizes }

    // MARK: configuration space (struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val)

    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let c = configuration.withLock { $0 }
        let bytes = LittleEndian.bytes(UInt64(c.targetPages), 4) + LittleEndian.bytes(UInt64(c.actualPages), 4)
        for i in 0..<data.count {
            data[i] = offset >= 0 && offset + i < bytes.count ? bytes[offset + i] : 0 // hint id, poison: 0
        }
    }

    /// The driver writes only `actual` (offset 4); anything else is ignored.
    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {
        guard offset == 4, data.count == 4 else { return }
        let value = UInt32(LittleEndian.read(Array(data), at: 0, count: 4))
        configuration.withLock { $0.actualPages = value }
    }

    public var configurationGeneration: UInt32 { configuration.withLock { $0.generation } }

    // MARK: the host's side

    /// Asks the guest to hold `pages` 4 KiB pages in its balloon (0: give them all back). The
    /// driver follows in its own time; `actualPages` says how far it got.
    public func setTarget(pages: UInt32) {
        let changed = configuration.withLock { c -> Bool in
            guard c.targetPages != pages else { return false }
            c.targetPages = pages
            c.generation &+= 1
            return true
        }
        if changed, let interrupt = live.withLock({ $0?.interrupt }) { interrupt.signalConfigurationChange() }
    }

    public var targetPages: UInt32 { configuration.withLock { $0.targetPages } }
    /// The pages the driver says are in the balloon.
    public var actualPages: UInt32 { configuration.withLock { $0.actualPages } }
    public var counters: Counters { stats.withLock { $0 } }

    // MARK: queues

    public func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        try queues[Self.inflateQueue].activate(activation, index: Self.inflateQueue)
        try queues[Self.deflateQueue].activate(activation, index: Self.deflateQueue)
        if activation.features & Feature.pageReporting != 0 {
            try queues[Self.reportingQueue].activate(activation, index: Self.reportingQueue)
        }
        live.withLock { $0 = (activation.interrupt, activation.features) }
    }

    public func reset() {
        for queue in queues { queue.reset() }
        live.withLock { $0 = nil }
        configuration.withLock { $0.actualPages = 0 }
    }

    public func requestStop() {
        for queue in queues { queue.halt() }
    }

    public var servedQueues: [Virtqueue?]? { queues.map(\.current) }

    public func queueNotified(_ index: Int) {
        switch index {
        case Self.inflateQueue: queues[index].serve { chain, memory in pages(chain, memory: memory, inflate: true) }
        case Self.deflateQueue: queues[index].serve { chain, memory in pages(chain, memory: memory, inflate: false) }
        case Self.reportingQueue: queues[index].serve { chain, memory in report(chain, memory: memory) }
        default: break
        }
    }

    /// An inflate or deflate request: little-endian 32-bit page frame numbers in the readable
    /// buffers. Inflated pages are given back to the host (runs of neighbouring pages at once);
    /// deflated ones need nothing (the guest's next touch gets a fresh page).
    func pages(_ chain: DescriptorChain, memory: GuestMemory, inflate: Bool) -> UInt32 {
        let bytes: [UInt8]
        do throws(SwiftletError) {
            bytes = try chain.readPrefix(Int(Self.maximumPagesPerRequest) * 4, memory: memory)
        } catch {
            onError(SwiftletError(error.code, "virtio-balloon: \(error.message)"))
            return 0
        }
        let count = bytes.count / 4
        guard inflate else {
            stats.withLock { $0.pagesDeflated += UInt64(count) }
            return 0
        }
        var rejected: UInt64 = 0
        var run: (first: UInt64, count: UInt64)?
        func flush() {
            guard let r = run else { return }
            if !discard(memory, GuestAddress(r.first * Self.pageSize), r.count * Self.pageSize) { rejected += r.count }
            run = nil
        }
        for i in 0..<count {
            let pfn = LittleEndian.read(bytes, at: i * 4, count: 4)
            if let r = run, r.first + r.count == pfn {
                run = (r.first, r.count + 1)
            } else {
                flush()
                run = (pfn, 1)
            }
        }
        flush()
        stats.withLock { s in
            s.pagesInflated += UInt64(count) - rejected
            s.rejected += rejected
        }
        return 0
    }

    /// A free page report: each writable buffer of the chain is a range of free guest memory.
    /// Nothing is written back; returning the chain tells the guest the host is done with it.
    func report(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        var reported: UInt64 = 0, rejected: UInt64 = 0
        for buffer in chain.writable where buffer.length > 0 {
            if discard(memory, buffer.address, UInt64(buffer.length)) {
                reported += UInt64(buffer.length)
            } else {
                rejected += 1
            }
        }
        stats.withLock { s in
            s.bytesReported += reported
            s.rejected += rejected
        }
        return 0
    }

    // MARK: snapshots

    /// The configuration the host set and the driver reported: target and actual pages.
    public var savedConfiguration: [UInt32]? {
        configuration.withLock { [$0.targetPages, $0.actualPages] }
    }

    public func restoreConfiguration(_ values: [UInt32]) throws(SwiftletError) {
        guard values.count == 2 else {
            throw SwiftletError(.invalidFormat, "saved virtio-balloon configuration has \(values.count) values, not 2")
        }
        configuration.withLock { c in
            c.targetPages = values[0]
            c.actualPages = values[1]
        }
    }
}
