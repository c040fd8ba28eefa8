import CLinux
import Devices
import Glibc
import Synchronization
import SwiftletSystem

/// The guest's vsock device: its context id and where its connections to the host go.
public struct VsockConfig: Sendable, Equatable {
    public var guestCID: UInt64
    /// Guest connections to host port `key` are connected to the Unix stream socket at `value`.
    public var forwards: [UInt32: String]

    public init(guestCID: UInt64 = 3, forwards: [UInt32: String] = [:]) {
        self.guestCID = guestCID; self.forwards = forwards
    }
}

/// Host ports backed by Unix sockets (as Firecracker's `uds_path_PORT`): each guest connection
/// opens a new connection to the socket; a port with no socket, or a socket nobody listens on,
/// refuses it.
struct UnixSocketPorts: VsockHostPorts {
    let forwards: [UInt32: String]

    func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        guard let path = forwards[port] else { return nil }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { close(fd); return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { close(fd); return nil }
        return fd
    }
}

/// Asks `first`, then `then`.
struct ChainedPorts: VsockHostPorts {
    let first: (any VsockHostPorts)?
    let then: any VsockHostPorts

    func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        first?.accept(port: port, from: guestPort) ?? then.accept(port: port, from: guestPort)
    }
}

/// One host port served in process: each guest connection to it becomes a socket pair whose
/// other end `connections` yields (to an `AgentSession`, say).
public final class InProcessPort: VsockHostPorts {
    public let port: UInt32
    private let pending = Mutex<[Int32]>([])
    private let ready: EventFD

    public init(port: UInt32) throws(SwiftletError) {
        self.port = port
        self.ready = try EventFD(nonBlocking: false)
    }

    public func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        guard port == self.port else { return nil }
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { return nil }
        pending.withLock { $0.append(pair[1]) }
        ready.signal()
        return pair[0]
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for the next connection; nil on timeout or
    /// when `cancel` becomes readable first.
    public func next(timeoutMilliseconds: Int32 = -1, cancel: Int32? = nil) -> OwnedFileDescriptor? {
        while true {
            if let fd = pending.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) { return OwnedFileDescriptor(taking: fd) }
            var fds = [pollfd(fd: ready.rawValue, events: Int16(POLLIN), revents: 0)]
            if let cancel { fds.append(pollfd(fd: cancel, events: Int16(POLLIN), revents: 0)) }
            let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMilliseconds) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0, fds[0].revents != 0 else { return nil }
            ready.drain()
        }
    }

    deinit { pending.withLock { for fd in $0 { close(fd) } } }
}
