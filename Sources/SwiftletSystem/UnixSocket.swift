import CLinux
import Glibc
import SystemPackage

/// Unix stream sockets (close-on-exec, like every descriptor Swiftlet opens): listening on a
/// path, accepting, connecting, socket pairs, and bytes sent with descriptors attached
/// (SCM_RIGHTS).
public enum UnixSocket {
    /// The most descriptors one message carries (the control buffer of `send` and `receive`).
    public static let maximumPassedDescriptors = 8

    /// The longest path a socket can be bound or connected at, in bytes (sun_path, less its NUL).
    public static let maximumPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// A socket listening at `path` (which must not exist) with room for `backlog` pending
    /// connections; only its owner may connect (mode 0600).
    public static func listen(at path: String, backlog: Int32 = 16) throws(SwiftletError) -> OwnedFileDescriptor {
        try checkLength(path)
        let fd = swiftlet_unix_listen(path, backlog)
        guard fd >= 0 else { throw SwiftletError.system("cannot listen on \(path)", errno: currentErrno) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// A socket connected to the one listening at `path`.
    public static func connect(to path: String) throws(SwiftletError) -> OwnedFileDescriptor {
        try checkLength(path)
        let fd = swiftlet_unix_connect(path)
        guard fd >= 0 else { throw SwiftletError.system("cannot connect to \(path)", errno: currentErrno) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// The next pending connection on `listener`, retrying EINTR; nil when none is pending (a
    /// non-blocking listener) or the one that was went away before it was accepted.
    public static func accept(_ listener: Int32) throws(SwiftletError) -> OwnedFileDescriptor? {
        let fd = swiftlet_accept(listener)
        if fd >= 0 { return OwnedFileDescriptor(taking: fd) }
        switch currentErrno {
        case .resourceTemporarilyUnavailable, .connectionAbort: return nil
        case let errno: throw SwiftletError.system("cannot accept a connection", errno: errno)
        }
    }

    /// Two connected stream sockets.
    public static func pair() throws(SwiftletError) -> SocketPair {
        var ends: [Int32] = [-1, -1]
        try systemCall("cannot create a socket pair") {
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends)
        }
        return SocketPair(first: OwnedFileDescriptor(taking: ends[0]), second: OwnedFileDescriptor(taking: ends[1]))
    }

    /// Sends `bytes` (at least one) with `descriptors` attached, without SIGPIPE if the peer has
    /// gone, retrying EINTR; returns how many bytes went (the descriptors go whole with the first).
    public static func send(_ socket: Int32, _ bytes: UnsafeRawBufferPointer, passing descriptors: [Int32] = [],
                            what: String = "socket") throws(SwiftletError) -> Int {
        guard !bytes.isEmpty else { throw SwiftletError(.invalidArgument, "cannot send nothing to the \(what)") }
        guard descriptors.count <= maximumPassedDescriptors else {
            throw SwiftletError(.invalidArgument, "cannot pass \(descriptors.count) descriptors in one message (at most \(maximumPassedDescriptors))")
        }
        // SAFETY: the shim reads `bytes.count` bytes of `bytes` and `descriptors.count` descriptors.
        let n = swiftlet_send_with_fds(socket, bytes.baseAddress, UInt(bytes.count), descriptors, Int32(descriptors.count))
        guard n >= 0 else { throw SwiftletError.system("cannot write to the \(what)", errno: currentErrno) }
        return n
    }

    /// Makes a send on the blocking stream socket `socket` (Unix or TCP) fail with EAGAIN when
    /// it could put nothing into the socket for `milliseconds` (a peer that stopped reading),
    /// instead of waiting for ever. A send that makes progress is not cut short.
    public static func setSendTimeLimit(_ socket: Int32, milliseconds: Int) throws(SwiftletError) {
        var limit = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        guard setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size)) == 0 else {
            throw SwiftletError.system("cannot set a socket's send time limit", errno: currentErrno)
        }
    }

    /// Sends all of `bytes` on a blocking socket, `descriptors` attached to the first part.
    public static func sendAll(_ socket: Int32, _ bytes: UnsafeRawBufferPointer, passing descriptors: [Int32] = [],
                               what: String = "socket") throws(SwiftletError) {
        var sent = 0
        while sent < bytes.count {
            // SAFETY: the range [sent, bytes.count) lies inside `bytes`.
            let rest = UnsafeRawBufferPointer(rebasing: bytes[sent...])
            sent += try send(socket, rest, passing: sent == 0 ? descriptors : [], what: what)
        }
    }

    /// Receives up to `buffer.count` bytes, retrying EINTR, and appends the descriptors that came
    /// with them (close-on-exec) to `descriptors`; returns the byte count, 0 at end of stream.
    /// More than `maximumDescriptors` descriptors in one message is an error, and every one of
    /// them is closed.
    public static func receive(_ socket: Int32, into buffer: UnsafeMutableRawBufferPointer,
                               descriptors: inout OwnedFileDescriptors, maximumDescriptors: Int = maximumPassedDescriptors,
                               what: String = "socket") throws(SwiftletError) -> Int {
        precondition(maximumDescriptors >= 0 && maximumDescriptors <= maximumPassedDescriptors)
        var passed = [Int32](repeating: -1, count: max(1, maximumDescriptors))
        var count: Int32 = 0
        // SAFETY: the shim writes at most `buffer.count` bytes into `buffer` and at most
        // `maximumDescriptors` (<= passed.count) descriptors into `passed`.
        let n = swiftlet_receive_with_fds(socket, buffer.baseAddress, UInt(buffer.count), &passed, Int32(maximumDescriptors), &count)
        guard n >= 0 else {
            let errno = currentErrno
            if errno == .messageTooLong {
                throw SwiftletError(.invalidFormat, "more descriptors came on the \(what) than the \(maximumDescriptors) expected: all were closed")
            }
            throw SwiftletError.system("cannot read the \(what)", errno: errno)
        }
        descriptors.append(contentsOf: OwnedFileDescriptors(taking: Array(passed.prefix(Int(count)))))
        return n
    }

    /// Which directions `shutdown` ends.
    public enum Direction: Sendable {
        case reading, writing, both
    }

    /// Ends the connection in `direction` (the peer reads end of file once writing ends); a
    /// thread blocked reading the socket returns. Errors (a socket no longer connected) are ignored.
    public static func shutdown(_ socket: Int32, _ direction: Direction = .both) {
        let how: Int32
        switch direction {
        case .reading: how = Int32(SHUT_RD)
        case .writing: how = Int32(SHUT_WR)
        case .both: how = Int32(SHUT_RDWR)
        }
        _ = Glibc.shutdown(socket, how)
    }

    private static func checkLength(_ path: String) throws(SwiftletError) {
        let length = path.utf8.count
        guard length <= maximumPathLength else {
            throw SwiftletError(.invalidArgument, "the socket path \(path) is too long: \(length) bytes, where a Unix socket path holds at most \(maximumPathLength); use a shorter directory",
                                cause: .fileNameTooLong)
        }
    }
}

/// Two connected sockets: what goes into one comes out of the other.
@frozen public struct SocketPair: ~Copyable, Sendable {
    public let first: OwnedFileDescriptor
    public let second: OwnedFileDescriptor
}

/// The two ends of a pipe (`OwnedFileDescriptor.pipe()`).
@frozen public struct PipeEnds: ~Copyable, Sendable {
    public let readEnd: OwnedFileDescriptor
    public let writeEnd: OwnedFileDescriptor
}

extension OwnedFileDescriptor {
    /// A new pipe, both ends close-on-exec.
    public static func pipe() throws(SwiftletError) -> PipeEnds {
        var ends: [Int32] = [-1, -1]
        try systemCall("cannot create a pipe") { swiftlet_pipe(&ends) }
        return PipeEnds(readEnd: OwnedFileDescriptor(taking: ends[0]), writeEnd: OwnedFileDescriptor(taking: ends[1]))
    }
}
