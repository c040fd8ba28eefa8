import Virtio
import Devices
import Glibc
import Synchronization
import SwiftletSystem

/// The serial console's output: bytes from the guest, buffered and written to a file descriptor
/// at each newline, when the buffer fills, or when the I/O thread flushes a partial line.
final class ConsoleOutput: ByteSink {
    private let fd: Int32?
    private let buffer = Mutex<[UInt8]>([])
    static let capacity = 4096

    init(fd: Int32?) {
        self.fd = fd
        buffer.withLock { $0.reserveCapacity(Self.capacity) }
    }

    func write(_ byte: UInt8) {
        guard let fd else { return }
        buffer.withLock { b in
            b.append(byte)
            if byte == UInt8(ascii: "\n") || b.count >= Self.capacity { Self.drain(&b, to: fd) }
        }
    }

    /// Writes out whatever is buffered.
    func flush() {
        guard let fd else { return }
        buffer.withLock { Self.drain(&$0, to: fd) }
    }

    var hasPendingOutput: Bool { buffer.withLock { !$0.isEmpty } }

    private static func drain(_ b: inout [UInt8], to fd: Int32) {
        guard !b.isEmpty else { return }
        // A console whose reader went away (closed pipe) must not stop the guest: drop the bytes.
        _ = b.withUnsafeBytes { bytes in try? OwnedFileDescriptor.writeAll(fd: fd, bytes) }
        b.removeAll(keepingCapacity: true)
    }
}

/// A guest interrupt line driven through the hypervisor's in-kernel IOAPIC (KVM_IRQ_LINE on KVM).
struct VMInterruptLine: InterruptLine {
    let setLine: @Sendable (Bool) -> Void
    func setLevel(_ asserted: Bool) { setLine(asserted) }
}
