import Glibc
import Devices
import GuestMemory
import MachineState
import SwiftletSystem

/// How a pre-copy migration goes (`Machine.migrate`).
public struct MigrationOptions: Sendable {
    /// The longest the machine may stay paused: copying stops once what is left to send after
    /// the pause would take about this long at the rate measured so far.
    public var maximumDowntimeMilliseconds: Int = 50
    /// The most copying rounds while the machine runs (the first sends all of memory).
    public var maximumRounds: Int = 30
    /// The longest the copying may take before the migration is given up.
    public var timeLimitMilliseconds: Int = 120_000

    public init(maximumDowntimeMilliseconds: Int = 50, maximumRounds: Int = 30, timeLimitMilliseconds: Int = 120_000) {
        self.maximumDowntimeMilliseconds = maximumDowntimeMilliseconds
        self.maximumRounds = maximumRounds
        self.timeLimitMilliseconds = timeLimitMilliseconds
    }
}

/// What a migration did, as the source saw it.
public struct MigrationReport: Sendable, Codable, Equatable {
    public struct Round: Sendable, Codable, Equatable {
        /// Pages sent with their contents, and pages sent as zeros.
        public var pages: Int
        public var zeroPages: Int
        public var nanoseconds: UInt64
    }
    /// The rounds while the machine ran, the first (all of memory) first.
    public var rounds: [Round]
    /// Pages sent while the machine was paused.
    public var finalPages: Int
    /// From the pause on the source to the destination's word that it runs the machine.
    public var downtimeNanoseconds: UInt64
    /// From the handshake to the end.
    public var totalNanoseconds: UInt64
    public var bytesSent: UInt64
}

/// What one round of a migration is about to do (for progress lines).
public struct MigrationProgress: Sendable, Codable, Equatable {
    public var round: Int
    /// Pages this round sends.
    public var pages: Int
    /// Bytes sent so far.
    public var bytesSent: UInt64
    /// The rate of the rounds so far, bytes per second (nil before the first round ends).
    public var bytesPerSecond: Double?
}

extension Machine {
    /// Pages per `pages` message: 1 MiB.
    static let migrationRun = 256
    /// Bytes per `diskData` message at most.
    static let migrationDiskPiece = 1 << 20

    /// Moves this running machine to the destination at the other end of `socket` (a connected
    /// stream socket; `Machine.receiveMigration` there), which must hold `token`. Pre-copy:
    /// memory and writable disks are sent while the guest runs, then round after round the pages
    /// written since (the hypervisor's dirty log and the pages this process's devices wrote) and
    /// the disk chunks written since, until what is left would fit
    /// `options.maximumDowntimeMilliseconds`; then the machine pauses, the rest goes with its vCPU
    /// and device state (and `annotations`, as a snapshot's), and the destination restores it. On
    /// its `resumed` the machine here stops (its run ends with `.migrated`).
    ///
    /// Until the destination is told to take over (`go`), any failure (the stream, the
    /// destination refusing, the copying not converging within `options`) throws and this
    /// machine runs on as before. After `go`, a failure to hear back leaves this machine paused,
    /// not running, and throws saying so: the destination may run it, and both must never run.
    ///
    /// Not yet: post-copy.
    public func migrate(over socket: Int32, token: [UInt8], annotations: [String: String] = [:],
                        options: MigrationOptions = MigrationOptions(),
                        progress: (@Sendable (MigrationProgress) -> Void)? = nil) throws(SwiftletError) -> MigrationReport {
        try operations.withLock { _ throws(SwiftletError) in
            try migrateLocked(over: socket, token: token, annotations: annotations, options: options, progress: progress)
        }
    }

    /// What is still to send: pages of memory, chunks of each writable disk (by drive index).
    private struct Pending {
        var pages: [UInt64]
        var chunks: [Int: [UInt64]]

        var bytes: UInt64 {
            UInt64(Machine.count(pages)) * 4096 + chunks.values.reduce(0) { $0 + UInt64(Machine.count($1)) * VirtioBlockChunk.size }
        }

        mutating func add(_ other: Pending) {
            for i in pages.indices where i < other.pages.count { pages[i] |= other.pages[i] }
            for (drive, bits) in other.chunks {
                var mine = chunks[drive] ?? [UInt64](repeating: 0, count: bits.count)
                for i in mine.indices where i < bits.count { mine[i] |= bits[i] }
                chunks[drive] = mine
            }
        }
    }

    private func migrateLocked(over socket: Int32, token: [UInt8], annotations: [String: String], options: MigrationOptions,
                               progress: (@Sendable (MigrationProgress) -> Void)?) throws(SwiftletError) -> MigrationReport {
        let machine = try liveMachine()
        guard machine.memory.regions.count <= 64 else {
            throw SwiftletError(.unsupported, "guest memory has \(machine.memory.regions.count) regions; a migration carries at most 64")
        }
        let writable = machine.devices.drives.indices.filter { !machine.hardware.disks[$0].readOnly }
        let start = MonotonicClock.now
        let channel = try MigrationChannel.connect(socket, token: token)
        let wasPaused = machine.controller.isPaused
        var committed = false
        // Every page collected from the dirty logs: if the migration fails, the next diff
        // snapshot must still see them.
        var collected = [UInt64](repeating: 0, count: (machine.memory.pageCount + 63) / 64)
        var paused = wasPaused
        do throws(SwiftletError) {
            let id = try SnapshotID.random()
            var layout = id.bytes + LittleEndian.bytes(UInt64(machine.memory.regions.count), 4)
            for region in machine.memory.regions { layout += LittleEndian.bytes(region.start.rawValue, 8) + LittleEndian.bytes(region.size, 8) }
            try channel.send(.layout, layout)
            var disks = LittleEndian.bytes(UInt64(writable.count), 4)
            for index in writable {
                disks += LittleEndian.bytes(UInt64(index), 4) + LittleEndian.bytes(machine.devices.drives[index].device.backend.byteCount, 8)
            }
            try channel.send(.disks, disks)

            // Round 0: every page that is not zero (the destination starts from zeros) and every
            // disk's data, with the logs switched on (and emptied) first, so that what is written
            // meanwhile shows up in the next round.
            for index in writable { machine.devices.drives[index].device.startTrackingWrites() }
            _ = try takeWritten(machine, writable: writable, into: &collected)
            var rounds: [MigrationReport.Round] = []
            let budget = Double(options.maximumDowntimeMilliseconds) / 1000
            var rate: Double?
            var pending: Pending? = nil
            // Pages devices wrote while the machine ran: a device may write a page after it was
            // recorded and taken, so they all go again while it is paused.
            var deviceWritten = [UInt64](repeating: 0, count: collected.count)
            while true {
                let roundStart = MonotonicClock.now
                progress?(MigrationProgress(round: rounds.count, pages: pending.map { Self.count($0.pages) } ?? machine.memory.pageCount,
                                            bytesSent: channel.bytesSent, bytesPerSecond: rate))
                let before = channel.bytesSent
                let sent = try sendPages(machine.memory, dirty: pending?.pages, over: channel)
                try sendDisks(machine, writable: writable, chunks: pending?.chunks, over: channel)
                let seconds = Double(MonotonicClock.now - roundStart) / 1e9
                rounds.append(.init(pages: sent.pages, zeroPages: sent.zeroPages, nanoseconds: MonotonicClock.now - roundStart))
                if seconds > 0.001 { rate = Double(channel.bytesSent - before) / seconds }
                let (written, byDevices) = try takeWritten(machine, writable: writable, into: &collected)
                for i in deviceWritten.indices { deviceWritten[i] |= byDevices[i] }
                pending = written
                let left = Double(written.bytes)
                if let rate, left / rate <= budget { break }
                if rounds.count >= options.maximumRounds || MonotonicClock.now - start > UInt64(options.timeLimitMilliseconds) * 1_000_000 {
                    let mib = { (bytes: Double) in (bytes / 1_048_576 * 10).rounded() / 10 }
                    throw SwiftletError(.unsupported, "the migration does not converge: after \(rounds.count) rounds the guest still writes "
                                        + "\(mib(left)) MiB per round, more than \(options.maximumDowntimeMilliseconds) ms of downtime allows at "
                                        + "\(mib(rate ?? 0)) MiB/s; the machine keeps running here (allow more downtime or time)")
                }
            }

            // The pause: the rest of memory and disks, then the state.
            let pauseStart = MonotonicClock.now
            if !wasPaused { try pauseLocked(); paused = true }
            var final = pending!
            let (last, _) = try takeWritten(machine, writable: writable, into: &collected)
            final.add(last)
            for i in final.pages.indices { final.pages[i] |= deviceWritten[i] }
            let finalSent = try sendPages(machine.memory, dirty: final.pages, over: channel)
            try sendDisks(machine, writable: writable, chunks: final.chunks, over: channel)
            var snapshot = try pausedState(machine, id: id, annotations: annotations)
            for index in writable { snapshot.hardware.disks[index].file = SnapshotDirectory.diskFileName(index) }
            let state = try StateFile.encode(snapshot)
            guard state.count <= MigrationChannel.maximumPayload else {
                throw SwiftletError(.unsupported, "the machine's state is \(state.count) bytes; a migration carries at most \(MigrationChannel.maximumPayload)")
            }
            try channel.send(.state, state)
            try channel.send(.done)
            _ = try channel.receive(.ready)
            try channel.send(.go)
            committed = true
            _ = try channel.receive(.resumed)
            let end = MonotonicClock.now
            machine.controller.stop(.migrated)
            return MigrationReport(rounds: rounds, finalPages: finalSent.pages + finalSent.zeroPages,
                                   downtimeNanoseconds: end - pauseStart, totalNanoseconds: end - start, bytesSent: channel.bytesSent)
        } catch {
            if committed {
                throw SwiftletError(.systemCall, "the migration's last step failed (\(error.description)): the destination may be running the machine, "
                                    + "so it stays paused here; resume it only if the destination does not run it")
            }
            channel.abort(error.description)
            for index in writable { machine.devices.drives[index].device.stopTrackingWrites() }
            live.withLock { m in
                guard m != nil else { return }
                var carried = m!.carriedDirtyPages ?? [UInt64](repeating: 0, count: collected.count)
                for i in carried.indices where i < collected.count { carried[i] |= collected[i] }
                m!.carriedDirtyPages = carried
            }
            if paused && !wasPaused { Self.resume(machine) }
            throw error
        }
    }

    static func count(_ bitmap: [UInt64]) -> Int { bitmap.reduce(0) { $0 + $1.nonzeroBitCount } }

    /// Switches dirty logging on if it was off, and takes what was written since the last take:
    /// pages (the hypervisor's log and this process's writes, also added to `collected`) and the
    /// writable disks' chunks. Returns them, and the pages this process's devices wrote. Works
    /// while the machine runs.
    private func takeWritten(_ machine: LiveMachine, writable: [Int], into collected: inout [UInt64]) throws(SwiftletError) -> (Pending, [UInt64]) {
        var combined = [UInt64](repeating: 0, count: collected.count)
        let logging = live.withLock { $0?.dirtyLogging ?? false }
        var first = 0
        for (slot, region) in machine.memory.regions.enumerated() {
            let pages = Int(region.size / 4096)
            if logging {
                let bitmap = try machine.vm.dirtyPages(slot: UInt32(slot), pageCount: pages)
                for page in 0..<pages where bitmap[page / 64] >> UInt64(page % 64) & 1 != 0 {
                    combined[(first + page) / 64] |= 1 << UInt64((first + page) % 64)
                }
            } else {
                try machine.vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.start.rawValue, size: region.size,
                                               host: region.hostAddress, logDirtyPages: true, readOnly: false)
            }
            first += pages
        }
        if !logging {
            machine.memory.startTrackingWrites()
            live.withLock { $0?.dirtyLogging = true }
        }
        let written = machine.memory.takeWrittenPages()
        var byDevices = [UInt64](repeating: 0, count: combined.count)
        for i in combined.indices where i < written.count {
            combined[i] |= written[i]
            byDevices[i] = written[i]
        }
        for i in collected.indices { collected[i] |= combined[i] }
        var chunks: [Int: [UInt64]] = [:]
        for index in writable { chunks[index] = machine.devices.drives[index].device.takeWrittenChunks() }
        return (Pending(pages: combined, chunks: chunks), byDevices)
    }

    /// Sends the pages `dirty` marks (nil: every page that is not zero) in runs of up to
    /// `migrationRun` pages, pages that are all zeros as `zeroPages` (only when `dirty` names them).
    private func sendPages(_ memory: GuestMemory, dirty: [UInt64]?, over channel: MigrationChannel) throws(SwiftletError) -> (pages: Int, zeroPages: Int) {
        var pages = 0, zeroPages = 0
        var firstPage = 0
        for region in memory.regions {
            let count = Int(region.size / 4096)
            var page = 0
            while page < count {
                let global = firstPage + page
                if let dirty, dirty[global / 64] >> UInt64(global % 64) & 1 == 0 { page += 1; continue }
                let zero = Self.isZero(region.hostAddress + page * 4096)
                if zero && dirty == nil { page += 1; continue }
                // A run of pages alike: wanted, and all zero or all not.
                var end = page + 1
                while end < count && end - page < Self.migrationRun {
                    let next = firstPage + end
                    if let dirty, dirty[next / 64] >> UInt64(next % 64) & 1 == 0 { break }
                    if Self.isZero(region.hostAddress + end * 4096) != zero { break }
                    end += 1
                }
                let head = LittleEndian.bytes(UInt64(global), 8) + LittleEndian.bytes(UInt64(end - page), 4)
                if zero {
                    try channel.send(.zeroPages, head)
                    zeroPages += end - page
                } else {
                    // SAFETY: pages [page, end) lie inside the region's mapping.
                    try channel.sendCopy(.pages, head, of: UnsafeRawBufferPointer(start: region.hostAddress + page * 4096, count: (end - page) * 4096))
                    pages += end - page
                }
                page = end
            }
            firstPage += count
        }
        return (pages, zeroPages)
    }

    /// Sends the writable disks' bytes: with `chunks` nil, every data range of each; else the
    /// chunks marked for each drive.
    private func sendDisks(_ machine: LiveMachine, writable: [Int], chunks: [Int: [UInt64]]?, over channel: MigrationChannel) throws(SwiftletError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.migrationDiskPiece, alignment: 4096)
        defer { buffer.deallocate() }
        for index in writable {
            let backend = machine.devices.drives[index].device.backend
            var ranges: [Range<UInt64>] = []
            if let bits = chunks?[index] {
                for word in bits.indices where bits[word] != 0 {
                    for bit in 0..<64 where bits[word] >> UInt64(bit) & 1 != 0 {
                        let chunk = UInt64(word * 64 + bit)
                        let lower = chunk * VirtioBlockChunk.size
                        guard lower < backend.byteCount else { continue }
                        let upper = min(lower + VirtioBlockChunk.size, backend.byteCount)
                        if let last = ranges.last, last.upperBound == lower { ranges[ranges.count - 1] = last.lowerBound..<upper } else { ranges.append(lower..<upper) }
                    }
                }
            } else {
                ranges = try backend.dataRanges()
            }
            for range in ranges {
                var offset = range.lowerBound
                while offset < range.upperBound {
                    let count = Int(min(UInt64(buffer.count), range.upperBound - offset))
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                    try backend.read(into: piece, at: offset)
                    try channel.send(.diskData, LittleEndian.bytes(UInt64(index), 4) + LittleEndian.bytes(offset, 8), body: UnsafeRawBufferPointer(piece))
                    offset += UInt64(count)
                }
            }
        }
    }

    private static func isZero(_ page: UnsafeMutableRawPointer) -> Bool {
        // SAFETY: `page` is a whole page of guest memory.
        let words = page.assumingMemoryBound(to: UInt64.self)
        for i in 0..<512 where words[i] != 0 { return false }
        return true
    }

    /// `receiveMigration(over:into:maximumMemoryBytes:restore:)` after the handshake on `socket`
    /// with `token`.
    public static func receiveMigration(over socket: Int32, token: [UInt8], into directory: String,
                                        maximumMemoryBytes: UInt64 = 1 << 40,
                                        restore: (String) throws(SwiftletError) -> Machine) throws(SwiftletError) -> Machine {
        let channel = try MigrationChannel.accept(socket, token: token)
        return try receiveMigration(over: channel, into: directory, maximumMemoryBytes: maximumMemoryBytes, restore: restore)
    }

    /// The destination's side of `migrate`, once `channel` is authenticated
    /// (`MigrationChannel.accept`): takes the machine arriving into a new snapshot directory
    /// `directory` (a memory file filled as pages arrive, the writable disks' files, then the
    /// state file), calls `restore` with it, tells the source it is ready, and on `go` returns
    /// the restored machine for the caller to run at once (the source has stopped its copy). The
    /// directory must stay while the machine runs (its memory maps the file).
    ///
    /// Everything that arrives is checked: the layout (at most 64 regions, page-aligned, at most
    /// `maximumMemoryBytes` in all), every page run and disk write against it, the state as any
    /// snapshot's on restore. On any failure the source is told (an `abort`; it keeps running),
    /// the directory is removed and the error thrown.
    public static func receiveMigration(over channel: MigrationChannel, into directory: String,
                                        maximumMemoryBytes: UInt64 = 1 << 40,
                                        restore: (String) throws(SwiftletError) -> Machine) throws(SwiftletError) -> Machine {
        let target = SnapshotDirectory(directory)
        if access(target.path, F_OK) == 0 {
            let error = SwiftletError(.invalidArgument, "\(directory) already exists: a received machine goes to a new directory")
            channel.abort(error.description)
            throw error
        }
        var committed = false
        do throws(SwiftletError) {
            let partial = try target.makePartial()
            defer { if !committed { partial.remove() } }
            let receiver = try MigrationReceiver(layout: try channel.receive(.layout), directory: partial, maximumBytes: maximumMemoryBytes)
            try receiver.disks(try channel.receive(.disks))
            var state: [UInt8]?
            receiving: while true {
                let (type, payload) = try channel.receive()
                switch type {
                case .pages where state == nil: try receiver.write(pages: payload)
                case .zeroPages where state == nil: try receiver.zero(payload)
                case .diskData where state == nil: try receiver.write(disk: payload)
                case .state where state == nil: state = payload
                case .done where state != nil: break receiving
                default: throw SwiftletError(.invalidFormat, "the migration stream sent \(type) out of turn")
                }
            }
            try receiver.finish()
            let stateFile = try OwnedFileDescriptor.open(partial.statePath, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot state file")
            try stateFile.write(state!, at: 0, what: partial.statePath)
            try systemCall("cannot sync \(partial.statePath)") { fsync(stateFile.rawValue) }
            try partial.commit(as: target)
            committed = true
        } catch {
            channel.abort(error.description)
            throw error
        }
        let machine: Machine
        do throws(SwiftletError) {
            machine = try restore(target.path)
        } catch {
            channel.abort("the destination cannot restore the machine: \(error.description)")
            target.remove()
            throw error
        }
        do throws(SwiftletError) {
            try channel.send(.ready)
            _ = try channel.receive(.go)
        } catch {
            channel.abort(error.description)
            target.remove()
            throw error
        }
        // From here the source has stopped for good: the machine runs here whatever happens to
        // the stream, so a lost `resumed` is not an error.
        try? channel.send(.resumed)
        return machine
    }
}

/// The size of the chunks a virtio-blk device records writes in.
enum VirtioBlockChunk {
    static let size = VirtioBlock.writeChunkSize
}

/// The destination's memory file as pages arrive: a full memory file (sparse, zeros until
/// written) laid out as the source's `layout` says, each run checked against it.
final class MigrationReceiver {
    let file: MemoryFile
    let descriptor: OwnedFileDescriptor
    let directory: SnapshotDirectory
    /// The writable disks' files by drive index, and their sizes.
    private(set) var diskFiles: [Int: DiskFile] = [:]
    final class DiskFile {
        let file: OwnedFileDescriptor
        let size: UInt64
        init(_ file: consuming OwnedFileDescriptor, size: UInt64) { self.file = file; self.size = size }
    }
    /// The most bytes all disks together may have.
    static let maximumDiskBytes: UInt64 = 1 << 44
    static let maximumDisks = 64

    init(layout: [UInt8], directory: SnapshotDirectory, maximumBytes: UInt64) throws(SwiftletError) {
        guard layout.count >= 20 else { throw SwiftletError(.invalidFormat, "the migration layout is truncated") }
        let count = Int(LittleEndian.read(layout, at: 16, count: 4))
        guard count >= 1, count <= 64, layout.count == 20 + count * 16 else {
            throw SwiftletError(.invalidFormat, "the migration layout names \(count) memory regions in \(layout.count) bytes")
        }
        var regions: [(start: GuestAddress, size: UInt64)] = []
        var total: UInt64 = 0
        for i in 0..<count {
            let start = LittleEndian.read(layout, at: 20 + i * 16, count: 8), size = LittleEndian.read(layout, at: 28 + i * 16, count: 8)
            guard size > 0, start % 4096 == 0, size % 4096 == 0, !start.addingReportingOverflow(size).overflow,
                  regions.last.map({ start >= $0.start.rawValue + $0.size }) ?? true else {
                throw SwiftletError(.invalidFormat, "the migration layout's memory region \(i) is not page-aligned, empty, or out of order")
            }
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard !overflow, sum <= maximumBytes else {
                throw SwiftletError(.invalidFormat, "the migrated machine's memory is larger than this host takes (\(maximumBytes >> 20) MiB)")
            }
            total = sum
            regions.append((GuestAddress(start), size))
        }
        file = MemoryFile.full(id: SnapshotID(bytes: Array(layout[0..<16])), regions: regions)
        self.directory = directory
        descriptor = try OwnedFileDescriptor.open(directory.memoryPath, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot memory file")
        let fd = descriptor.rawValue, bytes = file.fileBytes
        try systemCall("cannot size \(directory.memoryPath)") { ftruncate(fd, off_t(bytes)) }
        try descriptor.write(file.header, at: 0, what: directory.memoryPath)
    }

    /// The `disks` message: creates each writable disk's file (sparse, its size).
    func disks(_ payload: [UInt8]) throws(SwiftletError) {
        guard payload.count >= 4 else { throw SwiftletError(.invalidFormat, "the migration's disk list is truncated") }
        let count = Int(LittleEndian.read(payload, at: 0, count: 4))
        guard count <= Self.maximumDisks, payload.count == 4 + count * 12 else {
            throw SwiftletError(.invalidFormat, "the migration's disk list names \(count) disks in \(payload.count) bytes")
        }
        var total: UInt64 = 0
        for i in 0..<count {
            let index = Int(LittleEndian.read(payload, at: 4 + i * 12, count: 4)), size = LittleEndian.read(payload, at: 8 + i * 12, count: 8)
            let (sum, overflow) = total.addingReportingOverflow(size)
            guard index < Self.maximumDisks, diskFiles[index] == nil, !overflow, sum <= Self.maximumDiskBytes else {
                throw SwiftletError(.invalidFormat, "the migration's disk list is malformed (drive \(index), \(size) bytes)")
            }
            total = sum
            let path = try directory.diskPath(named: SnapshotDirectory.diskFileName(index))
            let file = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "migrated disk")
            let fd = file.rawValue
            try systemCall("cannot size \(path)") { ftruncate(fd, off_t(size)) }
            diskFiles[index] = DiskFile(file, size: size)
        }
    }

    /// The first page and page count of a run, checked against the layout.
    private func run(_ payload: [UInt8]) throws(SwiftletError) -> (first: Int, count: Int) {
        guard payload.count >= 12 else { throw SwiftletError(.invalidFormat, "a migration page run is truncated") }
        let first = LittleEndian.read(payload, at: 0, count: 8), count = LittleEndian.read(payload, at: 8, count: 4)
        guard count >= 1, count <= UInt64(Machine.migrationRun), first < UInt64(file.pageCount), count <= UInt64(file.pageCount) - first else {
            throw SwiftletError(.invalidFormat, "a migration page run (\(count) pages from page \(first)) lies outside the machine's \(file.pageCount) pages")
        }
        return (Int(first), Int(count))
    }

    func write(pages payload: [UInt8]) throws(SwiftletError) {
        let (first, count) = try run(payload)
        guard payload.count == 12 + count * 4096 else { throw SwiftletError(.invalidFormat, "a migration page run's length does not match its page count") }
        try payload.withBytes { raw throws(SwiftletError) in
            try descriptor.write(from: UnsafeRawBufferPointer(rebasing: raw[12...]), at: file.dataOffset + UInt64(first) * 4096, what: directory.memoryPath)
        }
    }

    func zero(_ payload: [UInt8]) throws(SwiftletError) {
        let (first, count) = try run(payload)
        guard payload.count == 12 else { throw SwiftletError(.invalidFormat, "a migration zero-page run carries bytes") }
        try descriptor.write([UInt8](repeating: 0, count: count * 4096), at: file.dataOffset + UInt64(first) * 4096, what: directory.memoryPath)
    }

    func write(disk payload: [UInt8]) throws(SwiftletError) {
        guard payload.count > 12, payload.count - 12 <= Machine.migrationDiskPiece else {
            throw SwiftletError(.invalidFormat, "a migration disk write is empty, truncated or too long")
        }
        let index = Int(LittleEndian.read(payload, at: 0, count: 4)), offset = LittleEndian.read(payload, at: 4, count: 8)
        guard let disk = diskFiles[index] else { throw SwiftletError(.invalidFormat, "a migration disk write names drive \(index), which is not in the disk list") }
        let length = UInt64(payload.count - 12)
        guard offset <= disk.size, length <= disk.size - offset else {
            throw SwiftletError(.invalidFormat, "a migration disk write (\(length) bytes at \(offset)) lies outside drive \(index)'s \(disk.size) bytes")
        }
        try payload.withBytes { raw throws(SwiftletError) in
            try disk.file.write(from: UnsafeRawBufferPointer(rebasing: raw[12...]), at: offset, what: "migrated disk \(index)")
        }
    }

    func finish() throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("cannot sync \(directory.memoryPath)") { fsync(fd) }
        for (index, disk) in diskFiles {
            let fd = disk.file.rawValue
            try systemCall("cannot sync migrated disk \(index)") { fsync(fd) }
        }
    }
}
