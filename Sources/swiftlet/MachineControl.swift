import CLinux
import FoundationEssentials
import Glibc
import Synchronization
import SwiftletSystem

// The control socket of a machine's VMM process: newline-delimited JSON over a Unix stream socket
// in the machine's directory (so only its owner reaches it). A client sends one request; `exec`
// passes the command's standard streams as descriptors (SCM_RIGHTS) with it, then sends
// `ExecControl` lines (signals, window size) until the VMM process answers with the outcome.

/// A request to a machine's VMM process.
struct ControlRequest: Codable {
    enum Operation: String, Codable {
        case status, stop, pause, resume, exec, snapshot
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
    // exec
    var status: Int32?
    var failure: String?
    // snapshot
    var snapshotID: String?
    var memoryPagesWritten: Int?
    var bytesWritten: UInt64?
    var pausedMilliseconds: Double?

    static func failed(_ message: String) -> ControlReply { ControlReply(error: message) }
}

/// One end of a control connection: JSON lines out, JSON lines (and passed descriptors) in.
final class ControlChannel: @unchecked Sendable {
    // SAFETY (Sendable): each side reads from one thread; `send` is serialized by `sending`.
    let fd: Int32
    private var buffer: [UInt8] = []
    private let sending = Mutex<Void>(())

    init(taking fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Connects to the control socket at `path`.
    static func connect(_ path: String) -> ControlChannel? {
        let fd = swiftlet_unix_connect(path)
        return fd >= 0 ? ControlChannel(taking: fd) : nil
    }

    func send<T: Encodable>(_ value: T, passing fds: [Int32] = []) throws(SwiftletError) {
        var bytes: [UInt8]
        do { bytes = Array(try JSONEncoder().encode(value)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode a control message: \(error)")
        }
        bytes.append(0x0A)
        try sending.withLock { (_: inout Void) throws(SwiftletError) in
            var sent = 0
            while sent < bytes.count {
                let n = bytes[sent...].withUnsafeBytes { raw in
                    sent == 0 ? swiftlet_send_with_fds(fd, raw.baseAddress, UInt(raw.count), fds, Int32(fds.count))
                              : Int(send_nosignal(fd, raw))
                }
                if n < 0 { throw SwiftletError.system("cannot write to the machine's control socket", errno: currentErrno) }
                sent += n
            }
        }
    }

    /// The next message and the descriptors that came with it; nil at end of stream.
    func receive<T: Decodable>(_ type: T.Type) throws(SwiftletError) -> (T, [Int32])? {
        var fds: [Int32] = []
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                do { return (try JSONDecoder().decode(T.self, from: Data(line)), fds) } catch {
                    fds.forEach { close($0) }
                    throw SwiftletError(.invalidFormat, "unreadable control message: \(error)")
                }
            }
            var chunk = [UInt8](repeating: 0, count: 16 << 10)
            var passed = [Int32](repeating: -1, count: 8)
            var count: Int32 = 0
            let n = chunk.withUnsafeMutableBytes { raw in
                swiftlet_receive_with_fds(fd, raw.baseAddress, UInt(raw.count), &passed, Int32(passed.count), &count)
            }
            fds += passed.prefix(Int(count))
            if n < 0 {
                let error = currentErrno
                fds.forEach { close($0) }
                throw SwiftletError.system("cannot read the machine's control socket", errno: error)
            }
            if n == 0 { fds.forEach { close($0) }; return nil }
            buffer += chunk[0..<n]
        }
    }

    /// Whether a complete message is already buffered (poll(2) would not report it).
    var hasBufferedMessage: Bool { buffer.contains(0x0A) }

    /// Ends the connection in both directions (a blocked reader on the other side sees its end).
    func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
}

private func send_nosignal(_ fd: Int32, _ raw: UnsafeRawBufferPointer) -> Int {
    Glibc.send(fd, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL))
}
