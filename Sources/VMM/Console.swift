import Virtio
import Devices
import Glibc
import Synchronization
import SwiftletSystem

/// The serial console's output: bytes from the guest, buffered and written to a file descriptor
/// at each newline, when the buffer fills, or when the I/O thread flushes a partial line.
///
/// A regular file (a machine's `console.log`, `run`'s temporary console) takes at most
/// `fileLimit` bytes of it (8 MiB): past that, the console's part of the file starts over with a
/// marker line and the newest output (64 KiB), so the file stays bounded whatever the guest
/// prints and still ends with what it printed last. Pipes and terminals are not limited: their
/// reader decides what to keep.
final class ConsoleOutput: ByteSink {
    static let capacity = 4096
    static let defaultFileLimit: UInt64 = 8 << 20
    /// How much of the newest output a file keeps when it starts over.
    static let keptOnRestart = 64 << 10

    private struct State {
        var buffer: [UInt8] = []
        /// Where the console's output began in a regular file (its size when the machine
        /// started); nil for pipes and terminals.
        var fileStart: UInt64?
        /// Bytes written since `fileStart`.
        var written: UInt64 = 0
        /// The newest output (up to twice what a restart keeps), for a regular file only.
        var recent: [UInt8] = []
        /// The file could not be cut back: nothing more goes to it.
        var abandoned = false
    }
    private let fd: Int32?
    private let fileLimit: UInt64
    private let state: Mutex<State>

    init(fd: Int32?, fileLimit: UInt64 = ConsoleOutput.defaultFileLimit) {
        self.fd = fd
        self.fileLimit = fileLimit
        var initial = State()
        initial.buffer.reserveCapacity(Self.capacity)
        initial.fileStart = fd.flatMap { OwnedFileDescriptor.regularFileSize(fd: $0) }
        state = Mutex(initial)
    }

    func write(_ byte: UInt8) {
        guard let fd else { return }
        state.withLock { s in
            s.buffer.append(byte)
            if byte == UInt8(ascii: "\n") || s.buffer.count >= Self.capacity { drain(&s, to: fd) }
        }
    }

    /// Writes out whatever is buffered.
    func flush() {
        guard let fd else { return }
        state.withLock { drain(&$0, to: fd) }
    }

    var hasPendingOutput: Bool { state.withLock { !$0.buffer.isEmpty } }

    private func drain(_ s: inout State, to fd: Int32) {
        guard !s.buffer.isEmpty, !s.abandoned else { return s.buffer.removeAll(keepingCapacity: true) }
        defer { s.buffer.removeAll(keepingCapacity: true) }
        // A console whose reader went away (closed pipe, full disk) must not stop the guest: the
        // bytes are dropped.
        guard let start = s.fileStart else {
            _ = s.buffer.withUnsafeBytes { bytes in try? OwnedFileDescriptor.writeAll(fd: fd, bytes) }
            return
        }
        let keep = min(Self.keptOnRestart, Int(fileLimit / 2))
        s.recent += s.buffer
        if s.recent.count > 2 * keep { s.recent.removeFirst(s.recent.count - keep) }
        var bytes = s.buffer
        if s.written + UInt64(bytes.count) > fileLimit {
            let marker = Array("[swiftlet: the console passed \(fileLimit) bytes; earlier output was dropped]\n".utf8)
            bytes = marker + s.recent.suffix(max(0, min(keep, Int(fileLimit) - marker.count)))
            s.written = 0
            guard (try? OwnedFileDescriptor.truncate(fd: fd, to: start, what: "the console file")) != nil else {
                s.abandoned = true
                return
            }
        }
        if bytes.withUnsafeBytes({ b in (try? OwnedFileDescriptor.writeAll(fd: fd, b)) != nil }) {
            s.written += UInt64(bytes.count)
        }
    }
}

/// A guest interrupt line driven through the hypervisor's in-kernel IOAPIC (KVM_IRQ_LINE on KVM).
struct VMInterruptLine: InterruptLine {
    let setLine: @Sendable (Bool) -> Void
    func setLevel(_ asserted: Bool) { setLine(asserted) }
}
