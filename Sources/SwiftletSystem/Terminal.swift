import CLinux
import Glibc

/// The host terminal in raw mode while a `-t` command runs.
public struct RawTerminal: Sendable {
    public let fd: Int32
    let saved: termios

    public init?(fd: Int32) {
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return nil }
        saved = t
        self.fd = fd
        cfmakeraw(&t)
        tcsetattr(fd, TCSANOW, &t)
    }

    public func restore() {
        var t = saved
        tcsetattr(fd, TCSANOW, &t)
    }

    public static func size(of fd: Int32) -> (rows: UInt16, columns: UInt16)? {
        var size = winsize()
        guard swiftlet_ioctl_ptr(fd, SWIFTLET_TIOCGWINSZ, &size) == 0 else { return nil }
        return (size.ws_row, size.ws_col)
    }
}
