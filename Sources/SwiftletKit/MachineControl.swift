import FoundationEssentials
import Glibc
import Synchronization
import SwiftletSystem
import VMM

// The control socket of a machine's VMM process: newline-delimited JSON over a Unix stream socket
// in the machine's directory (so only its owner reaches it). A client sends one request; `exec`
// passes the command's standard streams as descriptors (SCM_RIGHTS) with it, then sends
// `ExecControl` lines (signals, window size) until the VMM process answers with the outcome.

/// A request to a machine's VMM process.
struct ControlRequest: Codable {
    enum Operation: String, Codable {
        case status, stop, pause, resume, exec, snapshot, migrate, memory
    }
    var operation: Operation
    // exec
    var arguments: [String]?
    var environment: [String]?
    var workingDirectory: String?
    var user: String?
    var terminal: Bool?
    var rows: UInt16?
    var columns: UInt16?
    /// Whether the first passed descriptor is the command's input (else: output, error only).
    var input: Bool?
    // stop
    /// How long the guest gets to shut down cleanly before the machine is stopped by force.
    var timeoutMilliseconds: Int?
    // snapshot
    /// The directory to write the snapshot to (absolute; it must not exist), and whether it is a diff.
    var path: String?
    var diff: Bool?
    // migrate (the connected stream to the destination is the passed descriptor)
    var token: String?
    var maximumDowntimeMilliseconds: Int?
    var maximumRounds: Int?
    var timeLimitMilliseconds: Int?
    var bandwidthBytesPerSecond: UInt64?
    var postcopy: Bool?
    // memory: what the guest is to keep
    var memoryTargetMiB: Int?

    init(_ operation: Operation) { self.operation = operation }
}

/// Sent by an `exec` client while its command runs.
struct ExecControl: Codable {
    var signal: Int32?
    var rows: UInt16?
    var columns: UInt16?
}

/// The VMM process's answer.
struct ControlReply: Codable {
    var error: String?
    // status
    var state: String?
    var pid: Int32?
    var cpus: Int?
    var memoryMiB: Int?
    var uptimeMilliseconds: Int?
    /// The VMM process's resident memory (VmRSS), and the balloon's view of guest memory.
    var residentKiB: Int?
    var memory: MemoryStatus?
    // exec
    var status: Int32?
    var failure: String?
    // snapshot
    var snapshotID: String?
    var memoryPagesWritten: Int?
    var bytesWritten: UInt64?
    var pausedMilliseconds: Double?
    // migrate: progress lines while it goes, then the report
    var progress: MigrationProgress?
    var migration: MigrationReport?

    static func failed(_ message: String) -> ControlReply { ControlReply(error: message) }
}

/// One end of a control connection: JSON lines out, JSON lines (and passed descriptors) in.
final class ControlChannel: @unchecked Sendable {
    // SAFETY (Sendable): each side reads from one thread; `send` is serialized by `sending`.
    private let socket: OwnedFileDescriptor
    private var buffer: [UInt8] = []
    private let sending = Mutex<Void>(())

    var fd: Int32 { socket.rawValue }

    init(_ socket: consuming OwnedFileDescriptor) { self.socket = socket }

    /// Connects to the control socket at `path`; nil when nobody listens there.
    static func connect(_ path: String) -> ControlChannel? {
        guard let socket = try? UnixSocket.connect(to: path) else { return nil }
        return ControlChannel(socket)
    }

    func send<T: Encodable>(_ value: T, passing fds: [Int32] = []) throws(SwiftletError) {
        var bytes: [UInt8]
        do { bytes = Array(try JSONEncoder().encode(value)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode a control message: \(error)")
        }
        bytes.append(0x0A)
        let fd = fd
        try sending.withLock { (_: inout Void) throws(SwiftletError) in
            try bytes.withBytes { raw throws(SwiftletError) in
                try UnixSocket.sendAll(fd, raw, passing: fds, what: "machine's control socket")
            }
        }
    }

    /// The next message and the descriptors that came with it (the caller owns them); nil at end
    /// of stream. A message that cannot be read closes the descriptors that came with it.
    func receive<T: Decodable>(_ type: T.Type) throws(SwiftletError) -> (T, [Int32])? {
        var passed = OwnedFileDescriptors()
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                do { return (try JSONDecoder().decode(T.self, from: Data(line)), passed.release()) } catch {
                    throw SwiftletError(.invalidFormat, "unreadable control message: \(error)")
                }
            }
            var chunk = [UInt8](repeating: 0, count: 16 << 10)
            let fd = fd
            let n = try chunk.withMutableBytes { raw throws(SwiftletError) in
                try UnixSocket.receive(fd, into: raw, descriptors: &passed, what: "machine's control socket")
            }
            if n == 0 { return nil }
            buffer += chunk[0..<n]
        }
    }

    /// Whether a complete message is already buffered (poll(2) would not report it).
    var hasBufferedMessage: Bool { buffer.contains(0x0A) }

    /// Ends the connection in both directions (a blocked reader on the other side sees its end).
    func shutdown() { UnixSocket.shutdown(fd) }
}
