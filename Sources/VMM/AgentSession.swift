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

    /// Waits for the agent's `ready`; returns false if the connection ends first.
    public func waitUntilReady() throws(SwiftletError) -> Bool {
        while true {
            guard let message = try receive() else { return false }
            if case .ready(let version) = message {
                guard version == AgentMessage.version else {
                    throw SwiftletError(.unsupported, "the guest agent speaks protocol version \(version), this Swiftlet speaks \(AgentMessage.version): rebuild the guest image")
                }
                return true
            }
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
    /// so copies do not share random numbers. Sent on the first connection, after `ready`.
    public func announceNewIdentity(hostname: String?) throws(SwiftletError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 32, alignment: 8)
        defer { buffer.deallocate() }
        try SystemRandom.fill(buffer)
        let seed = Array(buffer.bindMemory(to: UInt8.self))
        try send(.identity(hostname: hostname ?? "", seed: seed))
    }

    /// Asks an agent that booted without a root filesystem to make `devices` (read-only layer
    /// disks, bottom first, under a writable tmpfs) its root; returns once it has. Sent after
    /// `ready`, before any command.
    public func mountRoot(devices: [String]) throws(SwiftletError) {
        try send(.mountRoot(devices: devices))
        while true {
            switch try receive() {
            case .rootMounted?: return
            case .failed(_, let message)?: throw SwiftletError(.guestFailure, "the guest could not mount its root filesystem: \(message)")
            case nil: throw SwiftletError(.guestFailure, "the guest agent hung up while mounting its root filesystem")
            default: continue
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

    /// The next message, reading as much as it takes; nil at end of stream.
    private func receive() throws(SwiftletError) -> AgentMessage? {
        while true {
            if let m = try decodeNext() { return m }
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
