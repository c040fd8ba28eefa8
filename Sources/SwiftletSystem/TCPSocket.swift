import CLinux
import Glibc

/// A TCP endpoint as the CLI takes it: `HOST:PORT`, `[IPV6]:PORT`.
public struct TCPEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT` or `[IPV6]:PORT`; throws `.invalidArgument` saying what is wrong.
    public init(parsing text: String) throws(SwiftletError) {
        let host: Substring, portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw SwiftletError(.invalidArgument, "\(text) is not [IPV6]:PORT")
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else {
                throw SwiftletError(.invalidArgument, "\(text) is not HOST:PORT (an IPv6 address goes in brackets: [::1]:7000)")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }) else {
            throw SwiftletError(.invalidArgument, "\(text) names no host (HOST:PORT, e.g. 127.0.0.1:7000)")
        }
        guard let port = UInt16(portText) else {
            throw SwiftletError(.invalidArgument, "\(text): the port must be a number from 0 to 65535")
        }
        self.host = String(host)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// TCP stream sockets (close-on-exec): listening, accepting, connecting.
public enum TCPSocket {
    /// A socket listening on `endpoint` (port 0: a free port, see `port(of:)`).
    public static func listen(on endpoint: TCPEndpoint, backlog: Int32 = 4) throws(SwiftletError) -> OwnedFileDescriptor {
        var resolveError: Int32 = 0
        let fd = swiftlet_tcp_listen(endpoint.host, endpoint.port, backlog, &resolveError)
        if fd == -2 {
            throw SwiftletError(.invalidArgument, "cannot listen on \(endpoint): \(String(cString: swiftlet_resolve_error(resolveError)))")
        }
        guard fd >= 0 else {
            let errno = currentErrno
            if errno == .addressInUse {
                throw SwiftletError(.invalidArgument, "cannot listen on \(endpoint): the port is in use (choose another with --listen)", cause: errno)
            }
            throw SwiftletError.system("cannot listen on \(endpoint)", errno: errno)
        }
        return OwnedFileDescriptor(taking: fd)
    }

    /// A socket connected to `endpoint`, within `timeoutMilliseconds` per address it resolves to.
    public static func connect(to endpoint: TCPEndpoint, timeoutMilliseconds: Int32 = 10_000) throws(SwiftletError) -> OwnedFileDescriptor {
        var resolveError: Int32 = 0
        let fd = swiftlet_tcp_connect(endpoint.host, endpoint.port, timeoutMilliseconds, &resolveError)
        if fd == -2 {
            throw SwiftletError(.invalidArgument, "cannot connect to \(endpoint): \(String(cString: swiftlet_resolve_error(resolveError)))")
        }
        guard fd >= 0 else { throw SwiftletError.system("cannot connect to \(endpoint)", errno: currentErrno) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// The local port `socket` is bound to.
    public static func port(of socket: Int32) throws(SwiftletError) -> UInt16 {
        let port = swiftlet_tcp_port(socket)
        guard port >= 0 else { throw SwiftletError.system("cannot read a socket's port", errno: currentErrno) }
        return UInt16(port)
    }

    /// The next connection on `listener` (TCP_NODELAY set), waiting at most until `deadline` (a
    /// `MonotonicClock.now` reading; nil: no limit) or until `cancel` (a descriptor, -1: none)
    /// becomes readable; nil then.
    public static func accept(_ listener: Int32, deadline: UInt64? = nil, cancel: Int32 = -1) throws(SwiftletError) -> OwnedFileDescriptor? {
        while true {
            let ready = try Poll.wait(cancel >= 0 ? [listener, cancel] : [listener], deadline: deadline)
            if ready.count > 1 && ready[1] { return nil }
            guard ready[0] else { return nil }
            if let connection = try UnixSocket.accept(listener) {
                swiftlet_tcp_nodelay(connection.rawValue)
                return connection
            }
        }
    }
}
