import AgentProtocol
import Glibc
import Synchronization
import SwiftletSystem

/// The host's side of the connection to a guest's `swiftlet-init`: waits for it to be ready, runs a
/// command, and relays the command's standard streams and signals until it ends.
public final class AgentSession: @unchecked Sendable {
    // SAFETY (Sendable): received from by one thread at a time (the one running `run`); `send`
    // is serialized by `sending`, and `shutdown` only shuts the socket down: both are safe from
    // any thread.
    private let socket: OwnedFileDescriptor
    private let sending = Mutex<Void>(())
    private var reader = AgentFrameReader()
    private var buffer = [UInt8](repeating: 0, count: 64 << 10)

    public init(socket: consuming OwnedFileDescriptor) {
        self.socket = socket
    }

    /// How long a new connection has to say `ready` and prove it is the agent.
    public static let handshakeTimeoutMilliseconds = 5_000

    /// The next session with `machine`'s guest agent on `port`. Connections are taken as they
    /// come; the first whose peer says `ready` and proves it holds the machine's agent key
    /// (`AgentKey`; on a booted machine's first session it is given the key first) is the
    /// session. Any other (closed, silent for `handshakeTimeoutMilliseconds`, malformed, without
    /// the proof) is dropped, `dropped` is told why, and the next one is tried. (Tests shorten
    /// `handshakeTimeoutMilliseconds`.)
    ///
    /// Returns nil when `cancel` becomes readable, or `timeoutMilliseconds` (-1: no limit) pass,
    /// before a session opens. Throws when no connection can be trusted (a machine restored from
    /// a snapshot without a key) or the agent speaks another protocol version. `connected` is
    /// called as each connection is taken.
    public static func open(on port: InProcessPort, for machine: Machine, timeoutMilliseconds: Int = -1, cancel: Int32? = nil,
                            handshakeTimeoutMilliseconds: Int = AgentSession.handshakeTimeoutMilliseconds,
                            connected: () -> Void = {}, dropped: (String) -> Void = { _ in }) throws(SwiftletError) -> AgentSession? {
        let (key, give) = try machine.agentKeyForSession()
        let deadline = timeoutMilliseconds < 0 ? nil : MonotonicClock.now + UInt64(timeoutMilliseconds) * 1_000_000
        while let connection = port.next(deadline: deadline, cancel: cancel) {
            connected()
            let session = AgentSession(socket: connection)
            let handshake = Deadline(milliseconds: handshakeTimeoutMilliseconds, before: deadline)
            do {
                // The key (on a booted machine's first session) and the challenge go out at once,
                // before `ready` comes: the agent reads them after it has sent `ready`, so the
                // handshake costs the guest one round trip, not two. `ready` proves nothing, so
                // nothing is given away that waiting for it would have kept.
                let nonce = try session.challenge(key: key, give: give)
                guard try session.waitUntilReady(handshake) else {
                    dropped("a connection to the agent's port closed before it said it was ready")
                    continue
                }
                try session.checkProof(key: key, nonce: nonce, handshake)
            } catch where error.code == .unsupported {
                throw error
            } catch {
                dropped("dropped a connection to the agent's port: \(error.message)")
                continue
            }
            if give { machine.agentHolds(key) }
            return session
        }
        return nil
    }

    /// Waits up to `timeoutMilliseconds` (nil: no limit) for the agent's `ready`; returns false
    /// if the connection ends first, and throws when the time runs out or the agent speaks another
    /// protocol version.
    public func waitUntilReady(timeoutMilliseconds: Int? = AgentSession.handshakeTimeoutMilliseconds) throws(SwiftletError) -> Bool {
        try waitUntilReady(timeoutMilliseconds.map { Deadline(milliseconds: $0) })
    }

    func waitUntilReady(_ deadline: Deadline?) throws(SwiftletError) -> Bool {
        // The agent's first message on a connection is always `ready`.
        switch try receive(deadline, failure: "the guest agent did not say it was ready") {
        case .ready(let version)?:
            guard version == AgentMessage.version else {
                throw SwiftletError(.unsupported, "the guest agent speaks protocol version \(version), this Swiftlet speaks \(AgentMessage.version): rebuild the guest image")
            }
            return true
        case _?: throw SwiftletError(.invalidFormat, "the connection's first message is not the agent's `ready`")
        case nil: return false
        }
    }

    /// Asks the peer to show it is the machine's agent: gives it `key` first when `give`, then
    /// sends a fresh random challenge, which only a holder of the key can answer. Returns the
    /// challenge's nonce, for `checkProof`.
    func challenge(key: AgentKey, give: Bool) throws(SwiftletError) -> [UInt8] {
        if give { try send(.agentKey(key.bytes)) }
        let nonce = try AgentKey.randomBytes(AgentAuthentication.nonceLength)
        try send(.challenge(nonce: nonce))
        return nonce
    }

    /// `challenge` and `checkProof` one after the other (a session already past `ready`).
    func authenticate(key: AgentKey, give: Bool, _ deadline: Deadline?) throws(SwiftletError) {
        try checkProof(key: key, nonce: try challenge(key: key, give: give), deadline)
    }

    /// Throws unless the peer's answer to the challenge with `nonce` is the right proof and comes
    /// before `deadline`.
    func checkProof(key: AgentKey, nonce: [UInt8], _ deadline: Deadline?) throws(SwiftletError) {
        switch try receive(deadline, failure: "its peer did not prove it is the guest agent") {
        case .proof(let proof)?:
            guard AgentAuthentication.verify(proof, key: key.bytes, nonce: nonce) else {
                throw SwiftletError(.permissionDenied, "its peer's proof does not match the machine's agent key: it is not the guest agent")
            }
        case .failed(_, let text)?:
            throw SwiftletError(.permissionDenied, "its peer could not prove it is the guest agent: \(text)")
        case _?:
            throw SwiftletError(.invalidFormat, "its peer answered the agent's challenge with another message than a proof")
        case nil:
            throw SwiftletError(.guestFailure, "its peer closed the connection instead of proving it is the guest agent")
        }
    }

    /// Where the command's streams go on the host.
    public struct Streams: Sendable {
        public var input: Int32?
        public var output: Int32
        public var error: Int32
        /// Host signals (blocked in the calling thread and read from this signalfd) to forward.
        /// SIGWINCH is not forwarded: it becomes a resize to `windowSize()`, when given.
        public var signals: Int32?
        public var windowSize: (@Sendable () -> (rows: UInt16, columns: UInt16)?)?

        public init(input: Int32?, output: Int32 = 1, error: Int32 = 2, signals: Int32? = nil,
                    windowSize: (@Sendable () -> (rows: UInt16, columns: UInt16)?)? = nil) {
            self.input = input; self.output = output; self.error = error; self.signals = signals
            self.windowSize = windowSize
        }
    }

    /// The command's outcome: its exit status (128 + N after signal N), and the agent's message
    /// when it could not start the command (status 127 or 126).
    public struct Outcome: Sendable, Equatable {
        public var status: Int32
        public var failure: String?
    }

    /// Runs `request` and relays its streams until it ends.
    public func run(_ request: ExecRequest, streams: Streams) throws(SwiftletError) -> Outcome {
        try send(.exec(request))
        // No host input: the command's input is empty, as if from /dev/null.
        if streams.input == nil { try send(.closeStdin) }
        var input = streams.input
        while true {
            let watched = [socket.rawValue, input ?? -1, streams.signals ?? -1]
            let ready = try Poll.wait(watched)
            for (fd, isReady) in zip(watched, ready) where isReady {
                if fd == socket.rawValue {
                    guard let messages = try receiveAvailable() else {
                        throw SwiftletError(.guestFailure, "the guest agent closed the connection before the command ended")
                    }
                    for message in messages {
                        switch message {
                        case .stdout(let bytes): write(bytes, to: streams.output)
                        case .stderr(let bytes): write(bytes, to: streams.error)
                        case .exited(let status): return Outcome(status: status, failure: nil)
                        case .failed(let status, let text): return Outcome(status: status, failure: text)
                        default: break
                        }
                    }
                } else if fd == input {
                    let count: Int
                    do throws(SwiftletError) {
                        count = try buffer.withMutableBytes { raw throws(SwiftletError) in
                            try OwnedFileDescriptor.readSome(fd: fd, into: raw, what: "the command's input")
                        }
                    } catch where error.cause == .resourceTemporarilyUnavailable {
                        continue
                    } catch {
                        count = 0 // an input that fails ends as if at its end
                    }
                    if count > 0 {
                        try send(.stdin(Array(buffer[0..<count])))
                    } else {
                        try send(.closeStdin)
                        input = nil
                    }
                } else if fd == streams.signals {
                    while let signal = SignalFD.next(from: fd) {
                        if signal == SIGWINCH {
                            if let size = streams.windowSize?() { try send(.resize(rows: size.rows, columns: size.columns)) }
                        } else {
                            try send(.signal(signal))
                        }
                    }
                }
            }
        }
    }

    /// Tells the agent the terminal's new size.
    public func resize(rows: UInt16, columns: UInt16) throws(SwiftletError) {
        try send(.resize(rows: rows, columns: columns))
    }

    /// Tells the agent its machine is a new copy of another (restored under a new name, or forked):
    /// it takes `hostname` (nil: keeps its own) and reseeds the kernel's random generator with fresh host randomness,
    /// so copies do not share random numbers. Sent on the first session (`open`) after the restore.
    public func announceNewIdentity(hostname: String?) throws(SwiftletError) {
        try send(.identity(hostname: hostname ?? "", seed: try AgentKey.randomBytes(32)))
    }

    /// Asks an agent that booted without a root filesystem to make `devices` (read-only layer
    /// disks, bottom first, under a writable tmpfs) its root; returns once it has. Sent after
    /// `ready`, before any command.
    ///
    /// With `network`, the agent is sent `configureNetwork(network)` too, right behind (it does the
    /// two in order): the two answers come back without a round trip between.
    public func mountRoot(devices: [String], network: NetworkSetup? = nil) throws(SwiftletError) {
        let mount = Request(message: .mountRoot(devices: devices), answer: .rootMounted,
                            task: "mount its root filesystem", doing: "mounting its root filesystem")
        guard let network else { return try requests([mount]) }
        try requests([mount, try Self.networkRequest(network)])
    }

    /// Asks the agent to set up the guest's network interface (the one whose MAC is `setup.mac`):
    /// address, MTU, default route, /etc/resolv.conf and /etc/hosts; returns once it has. The
    /// agent waits briefly for the interface to appear. Idempotent: a restored machine that was
    /// set up before may be sent it again. Sent after `ready` (and `mountRoot`), before any command.
    public func configureNetwork(_ setup: NetworkSetup) throws(SwiftletError) {
        try requests([try Self.networkRequest(setup)])
    }

    private static func networkRequest(_ setup: NetworkSetup) throws(SwiftletError) -> Request {
        do {
            try setup.validate()
        } catch {
            throw SwiftletError(.invalidArgument, "cannot set up the guest's network: \(error.description)")
        }
        return Request(message: .configureNetwork(setup), answer: .networkConfigured, task: "set up its network", doing: "setting up its network")
    }

    /// A message to the agent, the answer that says it was done, and what to call it in an error.
    private struct Request {
        var message: AgentMessage, answer: AgentMessage, task: String, doing: String
    }

    /// Sends every request's message, then waits for their answers in order (other messages
    /// meanwhile are passed over); the agent's `failed` and a hang-up are errors saying what it
    /// could not `task` / was `doing` (the first request not yet answered).
    private func requests(_ list: [Request]) throws(SwiftletError) {
        for request in list { try send(request.message) }
        for request in list {
            answered: while true {
                switch try receive() {
                case request.answer?: break answered
                case .failed(_, let text)?: throw SwiftletError(.guestFailure, "the guest could not \(request.task): \(text)")
                case nil: throw SwiftletError(.guestFailure, "the guest agent hung up while \(request.doing)")
                default: continue
                }
            }
        }
    }

    /// Sends one message; safe from any thread while another runs a command (for signals).
    public func send(_ message: AgentMessage) throws(SwiftletError) {
        let frame = AgentFrame.encode(message)
        let fd = socket.rawValue
        let result = sending.withLock { _ in
            frame.withUnsafeBytes { bytes in Result { () throws(SwiftletError) in try OwnedFileDescriptor.writeAll(fd: fd, bytes) } }
        }
        try result.get()
    }

    /// Ends the connection in both directions: the agent ends the session's command, and `run`
    /// (on another thread) returns with an error.
    public func shutdown() {
        UnixSocket.shutdown(socket.rawValue)
    }

    /// Reads what the socket has and decodes every complete message; nil at end of stream.
    private func receiveAvailable() throws(SwiftletError) -> [AgentMessage]? {
        guard try readMore() else { return nil }
        var messages: [AgentMessage] = []
        while let m = try decodeNext() { messages.append(m) }
        return messages
    }

    /// A time limit: when it ends (a `MonotonicClock.now` reading), and how long it was, for messages.
    struct Deadline {
        var end: UInt64
        var milliseconds: Int

        /// `milliseconds` from now, or `outer` if that comes first.
        init(milliseconds: Int, before outer: UInt64? = nil) {
            let milliseconds = max(0, milliseconds)
            self.end = min(outer ?? .max, MonotonicClock.now + UInt64(milliseconds) * 1_000_000)
            self.milliseconds = milliseconds
        }
    }

    /// The next message, reading as much as it takes; nil at end of stream. With a `deadline`,
    /// throws `failure` once it passes before a whole message came.
    private func receive(_ deadline: Deadline? = nil, failure: String = "") throws(SwiftletError) -> AgentMessage? {
        while true {
            if let m = try decodeNext() { return m }
            if let deadline {
                // Checked even while bytes keep coming: a peer that never completes a message runs out of time too.
                let inTime = MonotonicClock.now < deadline.end
                guard inTime, try Poll.wait([socket.rawValue], deadline: deadline.end)[0] else { throw SwiftletError(.guestFailure, "\(failure) within \(deadline.milliseconds) ms") }
            }
            guard try readMore() else { return nil }
        }
    }

    /// Feeds one read's worth of the socket to the frame reader; false at end of stream.
    private func readMore() throws(SwiftletError) -> Bool {
        let fd = socket.rawValue
        let n = try buffer.withMutableBytes { raw throws(SwiftletError) in
            try OwnedFileDescriptor.readSome(fd: fd, into: raw, what: "from the guest agent")
        }
        reader.append(buffer[0..<n])
        return n > 0
    }

    private func decodeNext() throws(SwiftletError) -> AgentMessage? {
        do {
            return try reader.next()
        } catch {
            throw SwiftletError(.invalidFormat, error.description)
        }
    }

    private func write(_ bytes: [UInt8], to fd: Int32) {
        // A closed output (a pipe whose reader left) must not stop the relay: drop the bytes.
        _ = bytes.withUnsafeBytes { try? OwnedFileDescriptor.writeAll(fd: fd, $0) }
    }
}
