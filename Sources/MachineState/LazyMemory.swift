import GuestMemory
import Synchronization
import SwiftletSystem

/// Where a lazily restored machine's memory comes from: a full snapshot memory file's bytes
/// (docs/snapshot-format.md), in chunks that can be read alone (a pack's `memory` part).
public protocol MemoryImageSource: Sendable {
    /// The memory file's size in bytes.
    var size: UInt64 { get }
    /// The chunks' size: a multiple of the page size (the last chunk may be shorter).
    var chunkSize: Int { get }
    /// Whether chunk `index` is all zeros, known without reading it.
    func isZero(chunk index: Int) -> Bool
    /// Reads chunk `index` into `buffer` (exactly its length) and checks it: an error names what
    /// is damaged.
    func read(chunk index: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError)
}

/// A restored machine's memory that arrives as it is first touched (as Firecracker's and QEMU's
/// post-copy restores do): anonymous memory registered with a userfaultfd, and a thread that
/// answers each missing-page fault by filling the whole source chunk that holds the page (a
/// copy, or the zero page for a chunk of zeros), once. The vCPUs, the devices and the kernel on
/// their behalf (KVM) wait on a missing page until it is filled; pages never touched are never
/// read, decompressed or resident.
///
/// A chunk that cannot be read or is damaged is reported once to `onFailure` (the machine is to
/// stop: its memory is not what was saved), and its pages are filled with zeros so that no
/// thread waits forever. `stop()` (or the last reference going) ends the thread: only once
/// nothing touches the memory any more (the machine's threads have ended).
public final class LazyMemory: Sendable {
    public let memory: GuestMemory
    public let file: MemoryFile
    private let filler: Filler
    private let thread: Mutex<OSThread?>

    /// What the filling thread has done so far.
    public struct Progress: Sendable {
        /// Chunks read (and checked) and copied in; chunks of zeros mapped to the zero page.
        public var chunksCopied = 0
        public var chunksZero = 0
        /// Fault reports served (several threads may report one page).
        public var faults = 0
        public var failure: SwiftletError?
        var filled: Set<Int> = []
    }

    /// Reads the memory file's header from `source` (checked as a file's is, and tied to
    /// snapshot `id`), makes the guest memory it describes, registers it for missing-page faults
    /// and starts the thread that fills them. `what` names the source in errors. Throws
    /// (`.unsupported` when userfaultfd is not allowed here) before anything runs.
    public init(source: any MemoryImageSource, id: SnapshotID, what: String,
                onFailure: @escaping @Sendable (SwiftletError) -> Void) throws(SwiftletError) {
        let pageSize = Int(MemoryFile.pageSize)
        guard source.chunkSize >= pageSize, source.chunkSize % pageSize == 0, source.size >= MemoryFile.pageSize else {
            throw SwiftletError(.invalidFormat, "\(what) is not a memory image Swiftlet can restore lazily (chunks of \(source.chunkSize) bytes, \(source.size) bytes)")
        }
        var first = [UInt8](repeating: 0, count: Int(min(UInt64(source.chunkSize), source.size)))
        try first.withMutableBytes { buffer throws(SwiftletError) in try source.read(chunk: 0, into: buffer) }
        let file = try MemoryFile.parse(header: Array(first.prefix(pageSize)), size: source.size, path: what)
        guard file.kind == .full, file.id == id else {
            throw SwiftletError(.invalidFormat, "\(what) is not the full memory of snapshot \(id)")
        }
        let userFault: UserFaultFD
        do { userFault = try UserFaultFD() } catch {
            throw SwiftletError(.unsupported, "memory cannot be restored lazily here: \(error.message)", cause: error.cause)
        }
        let memory = try GuestMemory(file.regions.map { GuestMemory.RegionSpec(start: $0.start, size: $0.size) })
        for region in memory.regions { try userFault.register(region.hostAddress, length: region.size) }
        self.memory = memory
        self.file = file
        let filler = Filler(memory: memory, file: file, userFault: userFault, source: source,
                            stopEvent: try EventFD(nonBlocking: true), onFailure: onFailure)
        self.filler = filler
        let firstChunk = first
        thread = Mutex(try OSThread.start(name: "lazy-memory") { filler.serve(firstChunk: firstChunk) })
    }

    deinit { stop() }

    /// Ends the filling thread (idempotent). Call it once nothing touches the memory.
    public func stop() {
        guard let running = thread.withLock({ thread -> OSThread? in defer { thread = nil }; return thread }) else { return }
        filler.stopEvent.signal()
        running.join()
    }

    public var progress: Progress { filler.progress.withLock { $0 } }
}

/// The filling thread's side of a `LazyMemory` (the thread holds it, not the `LazyMemory`).
private final class Filler: Sendable {
    let memory: GuestMemory
    let file: MemoryFile
    let userFault: UserFaultFD
    let source: any MemoryImageSource
    let stopEvent: EventFD
    let progress = Mutex(LazyMemory.Progress())
    let onFailure: @Sendable (SwiftletError) -> Void

    init(memory: GuestMemory, file: MemoryFile, userFault: UserFaultFD, source: any MemoryImageSource,
         stopEvent: consuming EventFD, onFailure: @escaping @Sendable (SwiftletError) -> Void) {
        self.memory = memory; self.file = file; self.userFault = userFault; self.source = source
        self.stopEvent = stopEvent; self.onFailure = onFailure
    }

    /// The thread: waits for faults (or the stop event) and fills their chunks. `firstChunk`:
    /// chunk 0, read (and checked) for the header, not read again, and let go once filled.
    func serve(firstChunk: [UInt8]) {
        var firstChunk: [UInt8]? = firstChunk
        var buffer = [UInt8](repeating: 0, count: source.chunkSize)
        while true {
            guard let ready = try? Poll.wait([userFault.rawValue, stopEvent.rawValue]) else { return }
            if ready[1] { return }
            while let address = try? userFault.nextFault() {
                progress.withLock { $0.faults += 1 }
                guard let chunk = chunk(holding: address) else { continue }
                if progress.withLock({ $0.filled.contains(chunk) }) {
                    // Filled after this fault was reported (its thread is woken already, or
                    // now), or the page was given back to the host since (`GuestMemory.discard`:
                    // a page the guest freed, whose bytes do not matter) and is missing again:
                    // the zero page, else a wake.
                    if (try? userFault.zero(pageStart(address), length: MemoryFile.pageSize)) != .filled {
                        try? userFault.wake(pageStart(address), length: MemoryFile.pageSize)
                    }
                    continue
                }
                fill(chunk, buffer: &buffer, firstChunk: chunk == 0 ? firstChunk.take() : nil)
            }
        }
    }
    /// The host address of the page holding `address`.
    func pageStart(_ address: UInt64) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: UInt(address & ~(MemoryFile.pageSize - 1)))!
    }

    /// The source chunk that holds the page at host `address`, nil for an address outside the
    /// memory (never reported for registered memory).
    func chunk(holding address: UInt64) -> Int? {
        var fileOffset = file.dataOffset
        for region in memory.regions {
            let host = UInt64(UInt(bitPattern: region.hostAddress))
            if address >= host, address - host < region.size {
                return Int((fileOffset + (address - host)) / UInt64(source.chunkSize))
            }
            fileOffset += region.size
        }
        return nil
    }

    /// The pieces of guest memory chunk `index` covers: where in the chunk, where in memory, how long.
    func pieces(ofChunk index: Int) -> [(offset: Int, host: UnsafeMutableRawPointer, length: UInt64)] {
        let chunkStart = UInt64(index) * UInt64(source.chunkSize)
        let chunkEnd = min(chunkStart + UInt64(source.chunkSize), file.fileBytes)
        var pieces: [(offset: Int, host: UnsafeMutableRawPointer, length: UInt64)] = []
        var fileOffset = file.dataOffset
        for region in memory.regions {
            let start = max(chunkStart, fileOffset), end = min(chunkEnd, fileOffset + region.size)
            if start < end {
                pieces.append((Int(start - chunkStart), region.hostAddress + Int(start - fileOffset), end - start))
            }
            fileOffset += region.size
        }
        return pieces
    }

    /// Fills chunk `index` (read from the source into `buffer`, or taken from `readAlready`).
    func fill(_ index: Int, buffer: inout [UInt8], firstChunk readAlready: [UInt8]?) {
        let pieces = pieces(ofChunk: index)
        var zero = source.isZero(chunk: index)
        if !zero {
            let length = Int(min(UInt64(source.chunkSize), file.fileBytes - UInt64(index) * UInt64(source.chunkSize)))
            do throws(SwiftletError) {
                if let readAlready {
                    buffer.replaceSubrange(0..<length, with: readAlready.prefix(length))
                } else {
                    try buffer.withMutableBytes { raw throws(SwiftletError) in
                        try source.read(chunk: index, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]))
                    }
                }
            } catch {
                // Its memory is not what was saved: the machine is told to stop, and the pages
                // are zeros so that no thread waits for them forever.
                let first = progress.withLock { state -> Bool in
                    defer { if state.failure == nil { state.failure = error } }
                    return state.failure == nil
                }
                if first { onFailure(error) }
                zero = true
            }
        }
        for piece in pieces {
            let filled: UserFaultFD.Fill?
            if zero {
                filled = try? userFault.zero(piece.host, length: piece.length)
            } else {
                filled = buffer.withUnsafeBytes { raw in
                    try? userFault.copy(UnsafeRawBufferPointer(rebasing: raw[piece.offset..<piece.offset + Int(piece.length)]), to: piece.host)
                }
            }
            if filled != .filled { fillPageByPage(piece, zero: zero, buffer: buffer) }
        }
        progress.withLock { state in
            state.filled.insert(index)
            if zero { state.chunksZero += 1 } else { state.chunksCopied += 1 }
        }
    }

    /// Fills a piece one page at a time, skipping pages already there, and wakes its waiters:
    /// after a fill of the whole piece found a page there.
    func fillPageByPage(_ piece: (offset: Int, host: UnsafeMutableRawPointer, length: UInt64), zero: Bool, buffer: [UInt8]) {
        let page = Int(MemoryFile.pageSize)
        for start in stride(from: 0, to: Int(piece.length), by: page) {
            if zero {
                _ = try? userFault.zero(piece.host + start, length: UInt64(page))
            } else {
                _ = buffer.withUnsafeBytes { raw in
                    try? userFault.copy(UnsafeRawBufferPointer(rebasing: raw[piece.offset + start..<piece.offset + start + page]), to: piece.host + start)
                }
            }
        }
        try? userFault.wake(piece.host, length: piece.length)
    }
}
