import CLinux
import Glibc

/// An epoll(7) instance: level-triggered readiness for many descriptors, keyed by the descriptor.
public final class Epoll: Sendable {
    private let descriptor: OwnedFileDescriptor

    public struct Events: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: EPOLLIN.rawValue)
        public static let writable = Events(rawValue: EPOLLOUT.rawValue)
        /// Reported whether asked for or not: the peer hung up, or the descriptor failed.
        public static let hangUp = Events(rawValue: EPOLLHUP.rawValue)
        public static let error = Events(rawValue: EPOLLERR.rawValue)
    }

    public init() throws(SwiftletError) {
        let fd = try systemCall("cannot create an epoll instance") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    public func add(_ fd: Int32, _ events: Events) throws(SwiftletError) {
        try control(EPOLL_CTL_ADD, fd, events)
    }

    public func modify(_ fd: Int32, _ events: Events) throws(SwiftletError) {
        try control(EPOLL_CTL_MOD, fd, events)
    }

    public func remove(_ fd: Int32) {
        _ = epoll_ctl(descriptor.rawValue, EPOLL_CTL_DEL, fd, nil)
    }

    private func control(_ operation: Int32, _ fd: Int32, _ events: Events) throws(SwiftletError) {
        var event = epoll_event()
        event.events = events.rawValue
        event.data.fd = fd
        try systemCall("epoll_ctl failed for descriptor \(fd)") { epoll_ctl(descriptor.rawValue, operation, fd, &event) }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) and returns the ready descriptors; an
    /// interrupted wait returns none.
    public func wait(timeoutMilliseconds: Int32 = -1, maximum: Int = 64) -> [(fd: Int32, events: Events)] {
        var events = [epoll_event](repeating: epoll_event(), count: maximum)
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(descriptor.rawValue, $0.baseAddress, Int32(maximum), timeoutMilliseconds) }
        guard n > 0 else { return [] }
        return events[0..<Int(n)].map { ($0.data.fd, Events(rawValue: $0.events)) }
    }
}
