import Devices
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
        do { return try UnixSocket.connect(to: path).release() } catch { return nil }
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
    private let pending = Mutex(OwnedFileDescriptors())
    private let ready: EventFD

    public init(port: UInt32) throws(SwiftletError) {
        self.port = port
        self.ready = try EventFD(nonBlocking: false)
    }

    public func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        guard port == self.port else { return nil }
        let pair: SocketPair
        do { pair = try UnixSocket.pair() } catch { return nil }
        let sessionEnd = pair.second.release()
        pending.withLock { $0.append(OwnedFileDescriptor(taking: sessionEnd)) }
        ready.signal()
        return pair.first.release()
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for the next connection; nil on timeout or
    /// when `cancel` becomes readable first.
    public func next(timeoutMilliseconds: Int32 = -1, cancel: Int32? = nil) -> OwnedFileDescriptor? {
        let deadline = timeoutMilliseconds < 0 ? nil : MonotonicClock.now + UInt64(timeoutMilliseconds) * 1_000_000
        while true {
            if let connection = pending.withLock({ $0.removeFirst() }) { return connection }
            guard let ready = try? Poll.wait([self.ready.rawValue] + (cancel.map { [$0] } ?? []), deadline: deadline), ready[0] else { return nil }
            self.ready.drain()
        }
    }
}
