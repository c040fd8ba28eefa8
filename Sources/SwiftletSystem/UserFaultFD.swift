import CLinux
import Glibc

/// A userfaultfd(2): missing-page faults in registered anonymous memory are reported to its
/// reader instead of being filled with zeros, and the reader fills them (a copy, or the zero
/// page), waking the threads that wait. Faults the kernel takes for the process (KVM reading
/// guest memory, read(2) into it) are reported too, so a machine's memory can arrive lazily.
public final class UserFaultFD: Sendable {
    public let rawValue: Int32

    /// Opens one; fails (with errno's reason) where userfaultfd is not allowed: an unprivileged
    /// process on a host whose `vm.unprivileged_userfaultfd` is 0 and whose /dev/userfaultfd it
    /// cannot open.
    public init() throws(SwiftletError) {
        let fd = swiftlet_uffd_open()
        guard fd >= 0 else { throw SwiftletError.system("cannot open a userfaultfd", errno: currentErrno) }
        rawValue = fd
    }

    deinit { Glibc.close(rawValue) }

    /// Whether this process can open one (it is opened and closed again).
    public static var isAvailable: Bool { (try? UserFaultFD()) != nil }

    /// Reports missing-page faults in [start, start + length) (page-aligned anonymous memory).
    public func register(_ start: UnsafeMutableRawPointer, length: UInt64) throws(SwiftletError) {
        try systemCall("cannot register \(length) bytes of memory with a userfaultfd") {
            swiftlet_uffd_register(rawValue, UInt64(UInt(bitPattern: start)), length)
        }
    }

    /// The address of the next reported fault, nil when none is pending (it does not wait:
    /// `Poll` on `rawValue` for that). Other events are skipped.
    public func nextFault() throws(SwiftletError) -> UInt64? {
        while true {
            var address: UInt64 = 0
            let result = swiftlet_uffd_read_fault(rawValue, &address)
            if result == 1 { return address }
            if result == 0 { continue }
            if errno == EAGAIN { return nil }
            throw SwiftletError.system("cannot read a userfaultfd event", errno: currentErrno)
        }
    }

    /// How a fill went: done, or some page of the range was there already (filled by an
    /// earlier fill; the waiting threads still need `wake`).
    public enum Fill: Sendable { case filled, alreadyThere }

    /// Fills the missing pages of `destination` (page-aligned, `source.count` a multiple of the
    /// page size) with a copy of `source`, waking the threads waiting on them.
    public func copy(_ source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) throws(SwiftletError) -> Fill {
        try fill("copy") { swiftlet_uffd_copy(rawValue, UInt64(UInt(bitPattern: destination)), source.baseAddress, UInt64(source.count)) }
    }

    /// Maps the zero page over the missing pages of [destination, destination + length).
    public func zero(_ destination: UnsafeMutableRawPointer, length: UInt64) throws(SwiftletError) -> Fill {
        try fill("zero-fill") { swiftlet_uffd_zero(rawValue, UInt64(UInt(bitPattern: destination)), length) }
    }

    /// Wakes the threads waiting on [start, start + length).
    public func wake(_ start: UnsafeMutableRawPointer, length: UInt64) throws(SwiftletError) {
        try systemCall("cannot wake the threads waiting on lazily filled memory") {
            swiftlet_uffd_wake(rawValue, UInt64(UInt(bitPattern: start)), length)
        }
    }

    private func fill(_ what: String, _ call: () -> Int32) throws(SwiftletError) -> Fill {
        while true {
            if call() == 0 { return .filled }
            switch errno {
            case EEXIST: return .alreadyThere
            case EAGAIN: continue // the address space changed under the fill: try again
            default: throw SwiftletError.system("cannot \(what) lazily filled memory", errno: currentErrno)
            }
        }
    }
}
