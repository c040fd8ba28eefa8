import Glibc
import MachineState
import SwiftletSystem
import VMM

/// Where `machine receive` waits, and the token a source must show (printed for its user).
public struct MigrationInvitation: Sendable, Codable {
    public var token: String
    public var listen: String
}

/// What `machine receive` took in.
public struct ReceiveReport: Sendable, Codable {
    public var name: String
    /// From the start of the wait to the machine running here.
    public var milliseconds: Double
}

/// What `machine migrate` did (the source's view).
public struct MigrateReport: Sendable, Codable {
    public var name: String
    public var destination: String
    public var rounds: Int
    /// Pages sent in each round while the machine ran, then while it was paused.
    public var roundPages: [Int]
    public var finalPages: Int
    public var downtimeMilliseconds: Double
    public var totalMilliseconds: Double
    public var bytesSent: UInt64
    /// Post-copy: pages sent after the destination took over, and how many its guest asked for.
    public var postcopyPages: Int?
    public var postcopyRequestedPages: Int?
    /// The steps of the pause at the source, in milliseconds since it began.
    public var pauseSteps: [MigrationTimeline.Step]
}

extension Machines {
    /// Throws `.invalidArgument` unless `text` is a migration token as `receive` prints them.
    public static func checkMigrationToken(_ text: String) throws(SwiftletError) {
        _ = try MigrationChannel.token(fromText: text)
    }

    /// Waits on `listen` for a machine migrating here (`migrate` on the source), which runs here
    /// as machine `name` once it arrived, under the destination's own machine store. The token
    /// the source must hold is new and handed to `invited` (with the address, its port resolved
    /// when 0 was asked) before the wait; a connection without it is refused and the wait goes
    /// on, for at most `timeoutMilliseconds`. Returns once the machine runs here. On any failure
    /// nothing of the machine is left here and the source keeps running.
    public static func receive(as name: String, listen: TCPEndpoint, timeoutMilliseconds: Int = 600_000,
                               invited: (MigrationInvitation) -> Void) throws(SwiftletError) -> ReceiveReport {
        let start = MonotonicClock.now
        let directory = try MachineDirectory(name: name)
        try MachineDirectory.withLock { () throws(SwiftletError) in try directory.makeNew() }
        do throws(SwiftletError) {
            let listener = try TCPSocket.listen(on: listen)
            let bound = TCPEndpoint(host: listen.host, port: try TCPSocket.port(of: listener.rawValue))
            let token = MigrationChannel.tokenText(try MigrationChannel.newToken())
            let launch = try MachineLifecycle.Launch(directory, receiving: listener.rawValue, token: token, timeoutMilliseconds: timeoutMilliseconds)
            withExtendedLifetime(listener) {} // the VMM process has its own copy
            invited(MigrationInvitation(token: token, listen: bound.description))
            try launch.waitUntilReady(milliseconds: timeoutMilliseconds + 120_000)
        } catch {
            try? MachineDirectory.withLock { () throws(SwiftletError) in try directory.remove() }
            throw error
        }
        return ReceiveReport(name: name, milliseconds: Double(MonotonicClock.now - start) / 1e6)
    }

    /// Moves the running machine `name` to the destination waiting at `destination` (`receive`
    /// there) with its `token`: memory and disk while it runs, then a short pause for the rest
    /// (`options`). `progress` hears of each round. Once the destination runs it, the machine is
    /// removed here: its directory, disk and published ports. On failure it keeps running here
    /// (unless the very last step failed, which the error says: then it stays paused here).
    public static func migrate(_ name: String, to destination: TCPEndpoint, token: String, options: MigrationOptions = MigrationOptions(),
                               progress: (MigrationProgress) -> Void = { _ in }) throws(SwiftletError) -> MigrateReport {
        let directory = try MachineDirectory(name: name)
        _ = try MigrationChannel.token(fromText: token)
        guard case .running = directory.state else {
            throw SwiftletError(.invalidArgument, "machine \(name) is not running: only a running machine migrates (start it, or pack it with `swiftlet pack create --machine`)")
        }
        let connection = try TCPSocket.connect(to: destination)
        var request = ControlRequest(.migrate)
        request.token = token
        request.maximumDowntimeMilliseconds = options.maximumDowntimeMilliseconds
        request.maximumRounds = options.maximumRounds
        request.timeLimitMilliseconds = options.timeLimitMilliseconds
        request.bandwidthBytesPerSecond = options.bandwidthBytesPerSecond
        request.postcopy = options.postcopy
        let channel = try MachineLifecycle.connect(directory)
        try channel.send(request, passing: [connection.rawValue])
        withExtendedLifetime(connection) {} // the VMM process has its own copy
        var report: MigrationReport?
        while report == nil {
            guard let (reply, fds) = try channel.receive(ControlReply.self) else {
                throw SwiftletError(.guestFailure, "machine \(name)'s VMM process closed the control connection during the migration; see \(directory.logPath)")
            }
            _ = OwnedFileDescriptors(taking: fds)
            if let error = reply.error { throw SwiftletError(.invalidArgument, error) }
            if let line = reply.progress { progress(line) }
            report = reply.migration
        }
        // The machine runs on the destination: its VMM process here ends (setting its record
        // aside, so it never starts here again); then nothing of it stays. Best effort: a VMM
        // process slow to end leaves a directory without a record, which the name's next
        // `create` clears.
        let deadline = MonotonicClock.now + 30_000_000_000
        while case .running = directory.state, MonotonicClock.now < deadline { usleep(10_000) }
        try? MachineDirectory.withLock { () throws(SwiftletError) in
            let held = try directory.lockStopped()
            try directory.remove()
            _ = held
            MachineDirectory.removeUnusedForkBases()
        }
        let done = report!
        return MigrateReport(name: name, destination: destination.description, rounds: done.rounds.count, roundPages: done.rounds.map(\.pages),
                             finalPages: done.finalPages, downtimeMilliseconds: Double(done.downtimeNanoseconds) / 1e6,
                             totalMilliseconds: Double(done.totalNanoseconds) / 1e6, bytesSent: done.bytesSent,
                             postcopyPages: done.postcopyPages, postcopyRequestedPages: done.postcopyRequestedPages,
                             pauseSteps: done.pause.steps)
    }
}
