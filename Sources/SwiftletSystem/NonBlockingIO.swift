import Glibc
import SystemPackage

/// What one read or write on a non-blocking descriptor did.
public enum NonBlockingIO: Sendable, Equatable {
    /// Moved this many bytes (a read of 0: end of stream).
    case moved(Int)
    /// Nothing can move now (EAGAIN): wait until the descriptor is ready.
    case wouldBlock
    /// The descriptor failed (the peer is gone, for example).
    case failed(Errno)

    init(_ result: Result<Int, Errno>) {
        switch result {
        case .success(let n): self = .moved(n)
        case .failure(.resourceTemporarilyUnavailable), .failure(.wouldBlock): self = .wouldBlock
        case .failure(let errno): self = .failed(errno)
        }
    }
}

extension UnixSocket {
    /// One send of up to `bytes.count` bytes, without SIGPIPE if the peer has gone, EINTR retried.
    public static func sendSome(_ socket: Int32, _ bytes: UnsafeRawBufferPointer) -> NonBlockingIO {
        NonBlockingIO(retryingOnInterrupt { Glibc.send(socket, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL)) })
    }
}

extension OwnedFileDescriptor {
    /// One scattering read (readv) into `buffers`, in order, EINTR retried.
    public static func readSome(fd: Int32, into buffers: [UnsafeMutableRawBufferPointer]) -> NonBlockingIO {
        let vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        // SAFETY: readv writes at most each vector's length into that vector's buffer.
        return NonBlockingIO(retryingOnInterrupt { vectors.withUnsafeBufferPointer { readv(fd, $0.baseAddress, Int32($0.count)) } })
    }

    /// One read(2) into `buffer`, EINTR retried; allocates nothing (for loops that read often).
    public static func readSome(fd: Int32, into buffer: UnsafeMutableRawBufferPointer) -> NonBlockingIO {
        // SAFETY: read(2) writes at most `buffer.count` bytes into `buffer`.
        NonBlockingIO(retryingOnInterrupt { Glibc.read(fd, buffer.baseAddress, buffer.count) })
    }

    /// Closes a descriptor held by number (one whose `OwnedFileDescriptor` was released into a
    /// table). Not retried on EINTR: Linux has closed it either way.
    public static func close(raw fd: Int32) {
        _ = Glibc.close(fd)
    }
}
