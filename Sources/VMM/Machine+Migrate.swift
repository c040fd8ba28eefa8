import Glibc
import Synchronization
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
    /// The most bytes per second to send (nil: as fast as the stream takes them).
    public var bandwidthBytesPerSecond: UInt64?
    /// When the copying does not converge within the limits: switch to post-copy (the
    /// destination runs the machine at once and fetches the pages still here as its guest
    /// touches them, while the rest are pushed) instead of giving up.
    public var postcopy: Bool

    public init(maximumDowntimeMilliseconds: Int = 50, maximumRounds: Int = 30, timeLimitMilliseconds: Int = 120_000,
                bandwidthBytesPerSecond: UInt64? = nil, postcopy: Bool = false) {
        self.maximumDowntimeMilliseconds = maximumDowntimeMilliseconds
        self.maximumRounds = maximumRounds
        self.timeLimitMilliseconds = timeLimitMilliseconds
        self.bandwidthBytesPerSecond = bandwidthBytesPerSecond
        self.postcopy = postcopy
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
    /// Post-copy: pages sent after the destination took over, and how many of them its guest
    /// asked for (the rest were pushed); nil for a pre-copy migration.
    public var postcopyPages: Int? = nil
    public var postcopyRequestedPages: Int? = nil
    /// The steps of the pause here.
    public var pause = MigrationTimeline(start: 0)
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
    /// True on the last line: the machine pauses now, and `pages` (those written in the last
    /// round; a few more come while it stops) go with its state while it is paused.
    public var pausing: Bool? = nil
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
    ///
    /// `committed` is called once the destination was told to take over (the machine will not
    /// run here again): the caller lets go of what the destination needs now, such as
    /// published ports on the same host.
    public func migrate(over socket: Int32, token: [UInt8], annotations: [String: String] = [:],
                        options: MigrationOptions = MigrationOptions(),
                        progress: (@Sendable (MigrationProgress) -> Void)? = nil,
                        committed: (@Sendable () -> Void)? = nil) throws(SwiftletError) -> MigrationReport {
        try operations.withLock { _ throws(SwiftletError) in
            try migrateLocked(over: socket, token: token, annotations: annotations, options: options, progress: progress, onCommit: committed)
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
                               progress: (@Sendable (MigrationProgress) -> Void)?, onCommit: (@Sendable () -> Void)?) throws(SwiftletError) -> MigrationReport {
        // The directories are this host's: another host has other files (checked before anything pauses).
        guard shape.volumes.isEmpty else {
            throw SwiftletError(.unsupported, "a machine that shares host directories (--volume) cannot be moved to another host: the directories and the files its guest holds open there are this host's")
        }
        let machine = try liveMachine()
        guard machine.memory.regions.count <= 64 else {
            throw SwiftletError(.unsupported, "guest memory has \(machine.memory.regions.count) regions; a migration carries at most 64")
        }
        let writable = machine.devices.drives.indices.filter { !machine.hardware.disks[$0].readOnly }
        let start = MonotonicClock.now
        let channel = try MigrationChannel.connect(socket, token: token)
        channel.bandwidthBytesPerSecond = options.bandwidthBytesPerSecond
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
            var unconfirmedRounds = 0
            while true {
                let roundStart = MonotonicClock.now
                progress?(MigrationProgress(round: rounds.count, pages: pending.map { Self.count($0.pages) } ?? machine.memory.pageCount,
                                            bytesSent: channel.bytesSent, bytesPerSecond: rate))
                let before = channel.bytesSent
                let sent = try sendPages(machine.memory, dirty: pending?.pages, over: channel)
                try sendDisks(machine, writable: writable, chunks: pending?.chunks, over: channel)
                try channel.send(.roundEnd)
                unconfirmedRounds += 1
                let seconds = Double(MonotonicClock.now - roundStart) / 1e9
                rounds.append(.init(pages: sent.pages, zeroPages: sent.zeroPages, nanoseconds: MonotonicClock.now - roundStart))
                if seconds > 0.001 { rate = Double(channel.bytesSent - before) / seconds }
                let (written, byDevices) = try takeWritten(machine, writable: writable, into: &collected)
                for i in deviceWritten.indices { deviceWritten[i] |= byDevices[i] }
                pending = written
                let left = Double(written.bytes)
                if let rate, left / rate <= budget { break }
                if rounds.count >= options.maximumRounds || MonotonicClock.now - start > UInt64(options.timeLimitMilliseconds) * 1_000_000 {
                    if options.postcopy { break }
                    let mib = { (bytes: Double) in (bytes / 1_048_576 * 10).rounded() / 10 }
                    throw SwiftletError(.unsupported, "the migration does not converge: after \(rounds.count) rounds the guest still writes "
                                        + "\(mib(left)) MiB per round, more than \(options.maximumDowntimeMilliseconds) ms of downtime allows at "
                                        + "\(mib(rate ?? 0)) MiB/s; the machine keeps running here (allow more downtime or time)")
                }
            }

            // Before the pause, the destination takes in what is still in flight (socket buffers
            // hold megabytes, which it would otherwise still be writing while the machine waits).
            while unconfirmedRounds > 0 {
                _ = try channel.receive(.roundDone)
                unconfirmedRounds -= 1
            }

            progress?(MigrationProgress(round: rounds.count, pages: Self.count(pending!.pages), bytesSent: channel.bytesSent,
                                        bytesPerSecond: rate, pausing: true))
            // The pause: the rest of memory and disks, then the state. Post-copy (when the copy
            // did not converge): the disks now, the pages only after `go`.
            let pauseStart = MonotonicClock.now
            var pause = MigrationTimeline(start: pauseStart)
            if !wasPaused { try pauseLocked(); paused = true }
            pause.mark("paused")
            var final = pending!
            let (last, _) = try takeWritten(machine, writable: writable, into: &collected)
            final.add(last)
            for i in final.pages.indices { final.pages[i] |= deviceWritten[i] }
            let postcopy = options.postcopy && Double(final.bytes) / (rate ?? 1) > budget
            let finalSent = postcopy ? (pages: 0, zeroPages: 0) : try sendPages(machine.memory, dirty: final.pages, over: channel)
            try sendDisks(machine, writable: writable, chunks: final.chunks, over: channel)
            if postcopy { try channel.send(.postcopy, final.pages.flatMap { LittleEndian.bytes($0, 8) }) }
            pause.mark("memory and disks sent")
            var snapshot = try pausedState(machine, id: id, annotations: annotations)
            pause.mark("state taken")
            for index in writable { snapshot.hardware.disks[index].file = SnapshotDirectory.diskFileName(index) }
            let payload = try CompactCoder.encode(snapshot)
            pause.mark("state encoded")
            let state = StateFile.file(payload: payload)
            pause.mark("state checksummed")
            guard state.count <= MigrationChannel.maximumPayload else {
                throw SwiftletError(.unsupported, "the machine's state is \(state.count) bytes; a migration carries at most \(MigrationChannel.maximumPayload)")
            }
            try channel.send(.state, state)
            try channel.send(.done)
            pause.mark("state sent")
            if postcopy {
                var goSent = false
                let served: (resumed: UInt64, pages: Int, requested: Int)
                do throws(SwiftletError) {
                    served = try servePostcopy(machine.memory, pages: final.pages, over: channel, goSent: &goSent, onGo: onCommit)
                } catch {
                    committed = goSent
                    throw error
                }
                machine.controller.stop(.migrated)
                var report = MigrationReport(rounds: rounds, finalPages: 0, downtimeNanoseconds: served.resumed - pauseStart,
                                             totalNanoseconds: MonotonicClock.now - start, bytesSent: channel.bytesSent)
                report.postcopyPages = served.pages
                report.postcopyRequestedPages = served.requested
                report.pause = pause
                return report
            }
            _ = try channel.receive(.ready)
            pause.mark("destination ready")
            try channel.send(.go)
            committed = true
            onCommit?()
            _ = try channel.receive(.resumed)
            let end = MonotonicClock.now
            pause.mark("destination running")
            machine.controller.stop(.migrated)
            return MigrationReport(rounds: rounds, finalPages: finalSent.pages + finalSent.zeroPages,
                                   downtimeNanoseconds: end - pauseStart, totalNanoseconds: end - start, bytesSent: channel.bytesSent,
                                   pause: pause)
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

    /// Post-copy, once the state is sent (the machine paused here): answers the destination's
    /// requests for pages while it builds the machine, says `go` on its `ready` (`goSent`: from
    /// then on the machine must not run here), then pushes the pages `pages` marks, in order,
    /// answering requests for pages its guest waits for first, says `done` and waits for
    /// `complete`. Returns when the destination said it runs the machine, and the pages sent
    /// after the pause and how many of them were asked for.
    private func servePostcopy(_ memory: GuestMemory, pages: [UInt64], over channel: MigrationChannel,
                               goSent: inout Bool, onGo: (@Sendable () -> Void)?) throws(SwiftletError) -> (resumed: UInt64, pages: Int, requested: Int) {
        var unsent = pages
        var resumed: UInt64?
        var sent = 0, requested = 0
        let total = memory.pageCount
        /// Sends the pages of [first, first + count) that are still unsent, in runs (each within
        /// one region); returns how many.
        func send(_ first: Int, _ count: Int) throws(SwiftletError) -> Int {
            func isUnsent(_ page: Int) -> Bool { unsent[page / 64] >> UInt64(page % 64) & 1 != 0 }
            var marked = 0
            var page = first
            while page < first + count {
                guard isUnsent(page) else { page += 1; continue }
                var regionFirst = 0
                for region in memory.regions {
                    let pages = Int(region.size / 4096)
                    defer { regionFirst += pages }
                    guard page < regionFirst + pages else { continue }
                    var end = page + 1
                    while end < first + count && end < regionFirst + pages && isUnsent(end) { end += 1 }
                    for sentPage in page..<end { unsent[sentPage / 64] &= ~(1 << UInt64(sentPage % 64)) }
                    // SAFETY: pages [page, end) lie inside this region's mapping.
                    try channel.sendCopy(.pages, LittleEndian.bytes(UInt64(page), 8) + LittleEndian.bytes(UInt64(end - page), 4),
                                         of: UnsafeRawBufferPointer(start: region.hostAddress + (page - regionFirst) * 4096, count: (end - page) * 4096))
                    marked += end - page
                    page = end
                    break
                }
            }
            return marked
        }
        func answer(_ type: MigrationMessage, _ payload: [UInt8], goSent: inout Bool) throws(SwiftletError) {
            switch type {
            case .ready where !goSent:
                try channel.send(.go)
                goSent = true
                onGo?()
            case .resumed where goSent && resumed == nil: resumed = MonotonicClock.now
            case .request:
                guard payload.count == 12 else { throw SwiftletError(.invalidFormat, "a post-copy request is malformed") }
                let first = LittleEndian.read(payload, at: 0, count: 8), count = LittleEndian.read(payload, at: 8, count: 4)
                guard count >= 1, count <= UInt64(Self.migrationRun), first < UInt64(total), count <= UInt64(total) - first else {
                    throw SwiftletError(.invalidFormat, "a post-copy request (\(count) pages from \(first)) lies outside the machine's \(total) pages")
                }
                let n = try send(Int(first), Int(count))
                sent += n
                requested += n
            default: throw SwiftletError(.invalidFormat, "the migration stream sent \(type) during post-copy")
            }
        }
        while !goSent {
            let (type, payload) = try channel.receive()
            try answer(type, payload, goSent: &goSent)
        }
        var cursor = 0
        while cursor < total {
            while try channel.hasInput() {
                let (type, payload) = try channel.receive()
                try answer(type, payload, goSent: &goSent)
            }
            let count = min(Self.migrationRun, total - cursor)
            sent += try send(cursor, count)
            cursor += count
        }
        try channel.send(.done)
        while true {
            let (type, payload) = try channel.receive()
            if type == .complete { break }
            try answer(type, payload, goSent: &goSent)
        }
        return (resumed ?? MonotonicClock.now, sent, requested)
    }

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
        MemoryFile.isZeroPage(page)
    }

    /// `receiveMigration(over:into:maximumMemoryBytes:restore:)` after the handshake on `socket`
    /// with `token`.
    public static func receiveMigration(over socket: Int32, token: [UInt8], into directory: String,
                                        maximumMemoryBytes: UInt64 = 1 << 40,
                                        restore: (ArrivedSnapshot) throws(SwiftletError) -> Machine) throws(SwiftletError) -> IncomingMigration {
        let channel = try MigrationChannel.accept(socket, token: token)
        return try receiveMigration(over: channel, into: directory, maximumMemoryBytes: maximumMemoryBytes, restore: restore)
    }

    /// The destination's side of `migrate`, once `channel` is authenticated
    /// (`MigrationChannel.accept`): takes the machine arriving into a new snapshot directory
    /// `directory` (a memory file filled as pages arrive, the writable disks' files, then the
    /// state file), calls `restore` with it and returns the restored machine with the stream, for
    /// the caller to build and take over (`IncomingMigration`: only then is the source told to
    /// stop). The directory must stay while the machine runs (its memory maps the file).
    ///
    /// Everything that arrives is checked: the layout (at most 64 regions, page-aligned, at most
    /// `maximumMemoryBytes` in all), every page run and disk write against it, the state as any
    /// snapshot's on restore. On any failure the source is told (an `abort`; it keeps running),
    /// the directory is removed and the error thrown.
    public static func receiveMigration(over channel: MigrationChannel, into directory: String,
                                        maximumMemoryBytes: UInt64 = 1 << 40,
                                        restore: (ArrivedSnapshot) throws(SwiftletError) -> Machine) throws(SwiftletError) -> IncomingMigration {
        let target = SnapshotDirectory(directory)
        if access(target.path, F_OK) == 0 {
            let error = SwiftletError(.invalidArgument, "\(directory) already exists: a received machine goes to a new directory")
            channel.abort(error.description)
            throw error
        }
        var committed = false
        let receiver: MigrationReceiver
        var missing: [UInt64]?
        var stateArrived: UInt64 = 0
        do throws(SwiftletError) {
            let partial = try target.makePartial()
            defer { if !committed { partial.remove() } }
            receiver = try MigrationReceiver(layout: try channel.receive(.layout), directory: partial, maximumBytes: maximumMemoryBytes)
            try receiver.disks(try channel.receive(.disks))
            var state: [UInt8]?
            receiving: while true {
                let (type, payload) = try channel.receive()
                switch type {
                case .pages where state == nil: try receiver.write(pages: payload)
                case .zeroPages where state == nil: try receiver.zero(payload)
                case .roundEnd where state == nil:
                    try receiver.syncDisks()
                    // A source that gave up meanwhile has closed its end: the next receive
                    // reads its abort (and why), or finds the stream broken.
                    try? channel.send(.roundDone)
                case .diskData where state == nil: try receiver.write(disk: payload)
                case .postcopy where state == nil && missing == nil: missing = try receiver.pageBitmap(payload)
                case .state where state == nil:
                    state = payload
                    stateArrived = MonotonicClock.now
                case .done where state != nil: break receiving
                default: throw SwiftletError(.invalidFormat, "the migration stream sent \(type) out of turn")
                }
            }
            try receiver.finish()
            // Post-copy's memory is filled as the guest faults: no pages to copy in ahead.
            if missing == nil, let hot = try receiver.hotPages() {
                let set = try OwnedFileDescriptor.open(partial.workingSetPath, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "working-set file")
                try set.write(hot.encode(), at: 0, what: partial.workingSetPath)
            }
            // Not synced: the state only feeds this restore (a machine that arrived by migration
            // starts from its disk next time).
            let stateFile = try OwnedFileDescriptor.open(partial.statePath, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600, what: "snapshot state file")
            try stateFile.write(state!, at: 0, what: partial.statePath)
            // Not made durable either: after a crash the machine starts from its disk.
            try partial.commit(as: target, durably: false)
            committed = true
        } catch {
            channel.abort(error.description)
            throw error
        }
        var timeline = MigrationTimeline(start: stateArrived)
        timeline.mark("saved")
        let machine: Machine
        var postcopy: PostcopyPages?
        var postcopySender: MigrationSender?
        var fetcher: OSThread?
        do throws(SwiftletError) {
            if let missing {
                // The pages still at the source arrive on a thread of their own from now on: the
                // machine's build may touch some (it waits for them), and its guest the rest.
                let sender = MigrationSender(channel)
                let pages = try PostcopyPages(file: receiver.file, memoryPath: target.memoryPath, missing: missing) { first, count throws(SwiftletError) in
                    try sender.send(.request, LittleEndian.bytes(UInt64(first), 8) + LittleEndian.bytes(UInt64(count), 4))
                }
                fetcher = try OSThread.start(name: "postcopy") { IncomingMigration.fetch(sender, receiver, pages) }
                postcopy = pages
                postcopySender = sender
            }
            let arrived = ArrivedSnapshot(directory: target.path, lazyMemory: postcopy)
            machine = try restore(arrived)
            for step in arrived.steps.withLock({ $0 }) { timeline.mark(step.name, at: step.time) }
            timeline.mark("restored")
        } catch {
            channel.abort("the destination cannot restore the machine: \(error.description)")
            postcopy?.fail(error)
            fetcher?.join()
            target.remove()
            throw error
        }
        return IncomingMigration(machine: machine, sender: postcopySender ?? MigrationSender(channel), directory: target,
                                 postcopy: postcopy, fetcher: fetcher, timeline: timeline)
    }
}

/// A machine that arrived by migration (`Machine.receiveMigration`), restored but not yet built
/// nor running, and the stream to its source, which waits paused. The machine must be built
/// before the source is told to stop (a restore that fails while the machine is built, after
/// the source stopped, would leave it running nowhere): `run` does that, or a caller of
/// `runBlocking` calls `takeOver` then `confirmRunning` in `beforeGuestRuns`.
public final class IncomingMigration: @unchecked Sendable {
    // SAFETY (Sendable): until `go` the channel is used by one thread at a time: the one that
    // received the machine, then the one that builds it (`beforeGuestRuns`), strictly after.
    // After `go` (post-copy) one thread receives (the fetcher) and every send holds `sending`
    // (PostcopyPages's requests hold it through their closure).
    public let machine: Machine
    /// The snapshot directory the machine runs from (its memory maps the file there).
    public let directory: String
    private let sender: MigrationSender
    private var channel: MigrationChannel { sender.channel }
    private let snapshot: SnapshotDirectory
    private let postcopy: PostcopyPages?
    private let fetcher: OSThread?
    private let timelineLock: Mutex<MigrationTimeline>
    /// What the destination's part of the pause took, step by step (for its log).
    public var timeline: MigrationTimeline { timelineLock.withLock { $0 } }

    init(machine: Machine, sender: MigrationSender, directory: SnapshotDirectory, postcopy: PostcopyPages?, fetcher: OSThread?,
         timeline: MigrationTimeline) {
        self.timelineLock = Mutex(timeline)
        self.machine = machine
        self.sender = sender
        self.snapshot = directory
        self.directory = directory.path
        self.postcopy = postcopy
        self.fetcher = fetcher
    }

    /// Post-copy: the fetching thread ends with the stream (the source's `done`, or a failure);
    /// it holds nothing of this object.
    deinit {
        postcopy?.fail(SwiftletError(.invalidArgument, "the arriving machine was let go"))
        fetcher?.detach()
    }

    /// Whether the machine arrives by post-copy: it runs here while pages still come.
    public var isPostcopy: Bool { postcopy != nil }

    /// Tells the source that the machine is ready here and waits for its `go`. Throws when the
    /// source gave up or the stream broke: then the machine must not run (the source runs on),
    /// and the received snapshot is removed. After it returns the source has stopped for good.
    /// Post-copy: starts the thread that takes the pages still to come into the memory file.
    public func takeOver() throws(SwiftletError) {
        do throws(SwiftletError) {
            // The build's own steps (`Machine.buildSteps`), then its end.
            let steps = machine.buildSteps
            timelineLock.withLock { timeline in
                for step in steps where step.name != "start" { timeline.mark(step.name, at: step.end) }
                timeline.mark("built")
            }
            try sender.send(.ready)
            if let postcopy {
                // The fetching thread receives everything now; it tells of the `go`.
                try postcopy.waitForGo()
            } else {
                _ = try channel.receive(.go)
            }
            timelineLock.withLock { $0.mark("go") }
        } catch {
            channel.abort(error.description)
            postcopy?.fail(error)
            snapshot.remove()
            throw error
        }
    }

    /// Post-copy, from the restore on: writes each page run that arrives into the memory file
    /// and tells the waiting faults, notes the source's `go`, and on its `done` says `complete`.
    /// A broken stream, or a `done` with pages still missing, fails every wait (before `go` the
    /// machine does not run; after, it stops: its memory is gone).
    static func fetch(_ sender: MigrationSender, _ receiver: MigrationReceiver, _ pages: PostcopyPages) {
        do throws(SwiftletError) {
            while true {
                let (type, payload) = try sender.channel.receive()
                switch type {
                case .pages:
                    let (first, count) = try receiver.write(pages: payload)
                    pages.arrived(first: first, count: count)
                case .go where !pages.wentAhead: pages.go()
                case .done where pages.wentAhead:
                    guard pages.allArrived else { throw SwiftletError(.invalidFormat, "the migration source said done with pages still missing") }
                    try sender.send(.complete)
                    return
                default: throw SwiftletError(.invalidFormat, "the migration stream sent \(type) during post-copy")
                }
            }
        } catch {
            pages.fail(SwiftletError(error.code, "the machine's memory stopped arriving from the migration source: \(error.message)"))
        }
    }

    /// Tells the source the machine runs here (once its vCPUs are about to start). Best effort:
    /// after `go` the machine runs here whatever happens to the stream.
    public func confirmRunning() {
        try? sender.send(.resumed)
        mark("running")
    }

    /// Adds a step of the caller's to `timeline`.
    public func mark(_ step: String) {
        timelineLock.withLock { $0.mark(step) }
    }

    /// Tells the source that the machine will not run here (before `takeOver`): it runs on
    /// there. Removes the received snapshot.
    public func refuse(_ reason: String) {
        channel.abort(reason)
        snapshot.remove()
    }

    /// Builds the machine, takes it over from the source and runs it until it stops.
    public func run() async throws(SwiftletError) -> MachineRunReport {
        try await machine.offCooperativePool(thread: "swiftlet-main") { () throws(SwiftletError) in
            try self.machine.runBlocking(beforeGuestRuns: { _ throws(SwiftletError) in
                try self.takeOver()
                self.confirmRunning()
            })
        }
    }
}

/// The steps of a migration's pause, on either side: each step's name and its milliseconds
/// since the pause began there (the source: its vCPUs asked to stop; the destination: the
/// state's arrival, the last message the source sends while paused).
public struct MigrationTimeline: Sendable, Codable, Equatable, CustomStringConvertible {
    public struct Step: Sendable, Codable, Equatable {
        public var name: String
        public var milliseconds: Double
    }
    private var start: UInt64 = 0
    public private(set) var steps: [Step] = []
    private enum CodingKeys: String, CodingKey { case steps }

    init(start: UInt64) { self.start = start }

    mutating func mark(_ name: String, at time: UInt64 = MonotonicClock.now) {
        steps.append(Step(name: name, milliseconds: Double(Int64(bitPattern: time &- start)) / 1e6))
    }

    public static func == (a: Self, b: Self) -> Bool { a.steps == b.steps }

    public var description: String {
        steps.map { "\($0.name) +\(($0.milliseconds * 10).rounded() / 10) ms" }.joined(separator: ", ")
    }
}

/// The destination's sending side of a migration stream, one message at a time: after `go`,
/// post-copy requests (the memory filler's thread), `resumed` (the machine's) and `complete` (the
/// fetcher's) go out from different threads, while only the fetcher receives.
final class MigrationSender: @unchecked Sendable {
    // SAFETY (Sendable): every send holds `lock`; receiving (the channel's other state) is one
    // thread's at a time (see IncomingMigration).
    let channel: MigrationChannel
    private let lock = Mutex<Void>(())

    init(_ channel: MigrationChannel) { self.channel = channel }

    func send(_ type: MigrationMessage, _ head: [UInt8] = []) throws(SwiftletError) {
        try lock.withLock { _ throws(SwiftletError) in try channel.send(type, head) }
    }
}

/// The snapshot a migration received, for the caller's restore: its directory and, for a
/// post-copy migration, the memory to restore it with (`Machine.restoring(…lazyMemory:)`): the
/// pages still at the source arrive as the guest touches them.
public final class ArrivedSnapshot: Sendable {
    public let directory: String
    public let lazyMemory: (any MemoryImageSource)?
    /// Steps of the caller's restore, for the destination's timeline (`mark`).
    let steps = Mutex<[(name: String, time: UInt64)]>([])

    /// Notes that a step of the restore ended now (the destination's log shows it in its pause).
    public func mark(_ name: String) { steps.withLock { $0.append((name, MonotonicClock.now)) } }

    init(directory: String, lazyMemory: (any MemoryImageSource)?) {
        self.directory = directory
        self.lazyMemory = lazyMemory
    }
}

/// A post-copy migration's memory, for `LazyMemory`: the memory file the migration filled, in
/// which the pages marked missing are written as they arrive after `go` (asked for here when the
/// guest touches them, pushed by the source otherwise). A chunk with missing pages asks for them
/// and waits (at most a minute); a stream that broke fails the wait, and the machine stops.
final class PostcopyPages: MemoryImageSource, @unchecked Sendable {
    // SAFETY (Sendable): the mutable state is in `state`; `reader` only reads.
    let size: UInt64
    let chunkSize = 64 << 10
    let file: MemoryFile
    private let reader: OwnedFileDescriptor
    private let state: ConditionLock<State>
    private let request: @Sendable (Int, Int) throws(SwiftletError) -> Void
    static let waitNanoseconds: UInt64 = 60_000_000_000

    struct State {
        var missing: [UInt64]
        var left: Int
        var failure: SwiftletError?
        /// The source said `go`.
        var go = false
    }

    init(file: MemoryFile, memoryPath: String, missing: [UInt64],
         request: @escaping @Sendable (Int, Int) throws(SwiftletError) -> Void) throws(SwiftletError) {
        self.file = file
        size = file.fileBytes
        reader = try OwnedFileDescriptor.open(memoryPath, flags: O_RDONLY, what: "the arriving machine's memory")
        state = ConditionLock(State(missing: missing, left: Machine.count(missing), failure: nil))
        self.request = request
    }

    var allArrived: Bool { state.withLock { $0.left == 0 } }

    func isZero(chunk index: Int) -> Bool { false }

    func read(chunk index: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) {
        let start = UInt64(index) * UInt64(chunkSize), end = start + UInt64(buffer.count)
        if end > file.dataOffset {
            let firstPage = Int((max(start, file.dataOffset) - file.dataOffset) / 4096)
            let lastPage = min(Int((end - file.dataOffset - 1) / 4096), file.pageCount - 1)
            func isMissing(_ s: State, _ page: Int) -> Bool { s.missing[page / 64] >> UInt64(page % 64) & 1 != 0 }
            let wanted = state.withLock { s -> ClosedRange<Int>? in
                let missing = (firstPage...lastPage).filter { isMissing(s, $0) }
                guard let first = missing.first, let last = missing.last else { return nil }
                return first...last
            }
            if let wanted {
                try request(wanted.lowerBound, wanted.count)
                let outcome = state.wait(until: { s in s.failure != nil || !wanted.contains { isMissing(s, $0) } },
                                         timeoutNanoseconds: Self.waitNanoseconds) { $0.failure }
                guard let outcome else {
                    throw SwiftletError(.systemCall, "pages \(wanted) of the arriving machine did not come within \(Self.waitNanoseconds / 1_000_000_000) s")
                }
                if let failure = outcome { throw failure }
            }
        }
        try reader.read(into: buffer, at: start, what: "the arriving machine's memory")
    }

    func arrived(first: Int, count: Int) {
        state.withLock { s in
            for page in first..<(first + count) where s.missing[page / 64] >> UInt64(page % 64) & 1 != 0 {
                s.missing[page / 64] &= ~(1 << UInt64(page % 64))
                s.left -= 1
            }
        }
    }

    func fail(_ error: SwiftletError) {
        state.withLock { s in if s.failure == nil { s.failure = error } }
    }

    /// The source's `go` came.
    func go() { state.withLock { $0.go = true } }
    var wentAhead: Bool { state.withLock { $0.go } }

    /// Waits (at most a minute) for the source's `go`; throws the stream's failure, or on timeout.
    func waitForGo() throws(SwiftletError) {
        let outcome = state.wait(until: { $0.go || $0.failure != nil }, timeoutNanoseconds: Self.waitNanoseconds) { $0.go ? nil : $0.failure }
        guard let outcome else { throw SwiftletError(.systemCall, "the migration source did not say go within \(Self.waitNanoseconds / 1_000_000_000) s") }
        if let failure = outcome { throw failure }
    }
}

/// The size of the chunks a virtio-blk device records writes in.
enum VirtioBlockChunk {
    static let size = VirtioBlock.writeChunkSize
}

/// The destination's memory file as pages arrive: a full memory file (sparse, zeros until
/// written) laid out as the source's `layout` says, each run checked against it. Used by one
/// thread at a time (the receiving one, then, post-copy, the fetcher).
final class MigrationReceiver: @unchecked Sendable {
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
    /// Disk writes arrived since the disks were last synced.
    private var disksUnsynced = false
    /// Pages that arrived, and pages that arrived again: written while the copy went on, the
    /// guest's busy pages (`hotPages`).
    private var arrived: [UInt64] = []
    private var arrivedAgain: [UInt64] = []
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
        arrived = [UInt64](repeating: 0, count: (file.pageCount + 63) / 64)
        arrivedAgain = arrived
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

    @discardableResult
    func write(pages payload: [UInt8]) throws(SwiftletError) -> (first: Int, count: Int) {
        let (first, count) = try run(payload)
        guard payload.count == 12 + count * 4096 else { throw SwiftletError(.invalidFormat, "a migration page run's length does not match its page count") }
        try payload.withBytes { raw throws(SwiftletError) in
            try descriptor.write(from: UnsafeRawBufferPointer(rebasing: raw[12...]), at: file.dataOffset + UInt64(first) * 4096, what: directory.memoryPath)
        }
        for page in first..<(first + count) {
            let word = page / 64, bit = UInt64(1) << UInt64(page % 64)
            if arrived[word] & bit != 0 { arrivedAgain[word] |= bit } else { arrived[word] |= bit }
        }
        return (first, count)
    }

    /// The pages that arrived more than once (the guest wrote them during the copy), as the
    /// restored machine's working set: it copies them in as the guest starts, so the guest's
    /// first writes to its busy pages do not each wait for a copy-on-write of the memory file's
    /// page. Nil when there are none.
    func hotPages() throws(SwiftletError) -> WorkingSet? {
        var runs: [Range<Int>] = []
        var start: Int?
        for (index, word) in arrivedAgain.enumerated() where word != 0 || start != nil {
            for bit in 0..<64 {
                let page = index * 64 + bit
                let set = word >> UInt64(bit) & 1 != 0 && page < file.pageCount
                if set, start == nil { start = page }
                if !set, let first = start { runs.append(first..<page); start = nil }
            }
        }
        if let first = start { runs.append(first..<file.pageCount) }
        return runs.isEmpty ? nil : try WorkingSet(snapshot: file.id, pageCount: file.pageCount, runs: runs)
    }

    /// The `postcopy` message: one bit per page of the layout, no more.
    func pageBitmap(_ payload: [UInt8]) throws(SwiftletError) -> [UInt64] {
        let words = (file.pageCount + 63) / 64
        guard payload.count == words * 8 else {
            throw SwiftletError(.invalidFormat, "the post-copy page list has \(payload.count) bytes; the machine's \(file.pageCount) pages take \(words * 8)")
        }
        var bitmap = (0..<words).map { LittleEndian.read(payload, at: $0 * 8, count: 8) }
        if file.pageCount % 64 != 0 { bitmap[words - 1] &= (1 << UInt64(file.pageCount % 64)) - 1 }
        return bitmap
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
        disksUnsynced = true
        try payload.withBytes { raw throws(SwiftletError) in
            try disk.file.write(from: UnsafeRawBufferPointer(rebasing: raw[12...]), at: offset, what: "migrated disk \(index)")
        }
    }

    /// Makes the disk writes that arrived since the last call durable. Called at the end of each
    /// round, so that only the writes sent while the machine is paused are synced in the pause.
    func syncDisks() throws(SwiftletError) {
        guard disksUnsynced else { return }
        for (index, disk) in diskFiles {
            let fd = disk.file.rawValue
            try systemCall("cannot sync migrated disk \(index)") { fdatasync(fd) }
        }
        disksUnsynced = false
    }

    /// The end of the stream: the disks are made durable (the source deletes its copy once the
    /// machine runs here). The memory file is not synced: it only feeds this restore, and a
    /// host that crashes takes the running machine with it whatever the file holds.
    func finish() throws(SwiftletError) {
        try syncDisks()
    }
}
