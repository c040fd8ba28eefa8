import CLinux
import Devices
import Glibc
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
