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
/// other end `next` yields (to `AgentSession.open`, which makes its peer prove it is the agent).
///
/// Only connections from a privileged guest port (`highestPrivilegedPort` or below) are taken:
/// Linux lets only a process with CAP_NET_BIND_SERVICE bind one, so an ordinary guest process
/// never reaches the queue. The queue is bounded (`maximumPending`; a new connection pushes the
/// oldest out) and a connection nobody took within `maximumAgeMilliseconds` is dropped. A dropped
/// connection's socket is closed, and the vsock device resets it in the guest.
public final class InProcessPort: VsockHostPorts {
    /// The highest guest port a connection may come from: Linux's vsock refuses to bind a port at
    /// or below LAST_RESERVED_PORT (1023, net/vmw_vsock/af_vsock.c) without CAP_NET_BIND_SERVICE
    /// (in the initial user namespace), and the ports it picks for unbound sockets are all above.
    public static let highestPrivilegedPort: UInt32 = 1023
    public static let maximumPending = 16
    public static let defaultMaximumAgeMilliseconds = 10_000

    public let port: UInt32
    private let maximumAge: UInt64
    private let pending = Mutex(Queue())
    private let ready: EventFD
    private let refused = Atomic<Int>(0)

    /// Connections waiting to be taken, oldest first, with when each came.
    private struct Queue: ~Copyable {
        var connections = OwnedFileDescriptors()
        var arrivals: [UInt64] = []

        /// Closes those that came before `cutoff`.
        mutating func expire(before cutoff: UInt64) {
            while let first = arrivals.first, first < cutoff { _ = take() }
        }

        mutating func take() -> OwnedFileDescriptor? {
            guard !arrivals.isEmpty else { return nil }
            arrivals.removeFirst()
            return connections.removeFirst()
        }
    }

    public init(port: UInt32, maximumAgeMilliseconds: Int = InProcessPort.defaultMaximumAgeMilliseconds) throws(SwiftletError) {
        self.port = port
        self.maximumAge = UInt64(max(0, maximumAgeMilliseconds)) * 1_000_000
        self.ready = try EventFD(nonBlocking: false)
    }

    /// Connections refused so far because they came from an unprivileged guest port.
    public var refusedConnections: Int { refused.load(ordering: .relaxed) }

    /// Connections waiting to be taken.
    public var pendingConnections: Int { pending.withLock { $0.arrivals.count } }

    public func accept(port: UInt32, from guestPort: UInt32) -> Int32? {
        guard port == self.port else { return nil }
        guard guestPort <= Self.highestPrivilegedPort else {
            refused.add(1, ordering: .relaxed)
            return nil
        }
        let pair: SocketPair
        do { pair = try UnixSocket.pair() } catch { return nil }
        let sessionEnd = pair.second.release()
        let now = MonotonicClock.now, cutoff = oldestKept(now: now)
        pending.withLock { queue in
            queue.expire(before: cutoff)
            while queue.arrivals.count >= Self.maximumPending { _ = queue.take() }
            queue.connections.append(OwnedFileDescriptor(taking: sessionEnd))
            queue.arrivals.append(now)
        }
        ready.signal()
        return pair.first.release()
    }

    /// The arrival time before which a waiting connection is too old.
    private func oldestKept(now: UInt64) -> UInt64 { now > maximumAge ? now - maximumAge : 0 }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for the next connection; nil on timeout or
    /// when `cancel` becomes readable first.
    public func next(timeoutMilliseconds: Int32 = -1, cancel: Int32? = nil) -> OwnedFileDescriptor? {
        let deadline = timeoutMilliseconds < 0 ? nil : MonotonicClock.now + UInt64(timeoutMilliseconds) * 1_000_000
        return next(deadline: deadline, cancel: cancel)
    }

    /// `next(timeoutMilliseconds:cancel:)` until `deadline` (a `MonotonicClock.now` reading; nil: no limit).
    public func next(deadline: UInt64?, cancel: Int32? = nil) -> OwnedFileDescriptor? {
        while true {
            let cutoff = oldestKept(now: MonotonicClock.now)
            if let connection = pending.withLock({ queue -> OwnedFileDescriptor? in
                queue.expire(before: cutoff)
                return queue.take()
            }) {
                return connection
            }
            guard let ready = try? Poll.wait([self.ready.rawValue] + (cancel.map { [$0] } ?? []), deadline: deadline), ready[0] else { return nil }
            self.ready.drain()
        }
    }
}
