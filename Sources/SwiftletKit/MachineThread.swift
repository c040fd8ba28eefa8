import Glibc
import Synchronization
import SwiftletSystem
import VMM

/// A machine running on a thread of its own, whose end can be waited for with poll(2) (`ended`).
public final class MachineThread: Sendable {
    public let machine: Machine
    private let worker: WorkerThread<MachineRunReport>

    /// Readable once the machine has stopped.
    public var ended: Int32 { worker.ended }

    /// Starts `machine`. `confined`: this process is the machine's VMM process, and confines
    /// itself (`Confinement.confine(.vmm)`: seccomp, no new privileges, descriptor and file-size limits) once the
    /// machine is built and before its guest runs. Never in a process that goes on to do other work.
    ///
    /// `built` is called on the machine's thread once it is built, before the confinement (an
    /// error ends the run before the guest runs), and `guestStarts` after it, just before the
    /// vCPUs start (a machine arriving by migration: the source's `go`, then `resumed`).
    public init(_ machine: Machine, confined: Bool = false, built: (@Sendable () throws(SwiftletError) -> Void)? = nil,
                guestStarts: (@Sendable () -> Void)? = nil) throws(SwiftletError) {
        self.machine = machine
        let hooked = confined || built != nil || guestStarts != nil
        worker = try WorkerThread(name: "machine", stackSize: 1 << 20) { () throws(SwiftletError) in
            try machine.runBlocking(beforeGuestRuns: hooked ? { largestFile throws(SwiftletError) in
                try built?()
                if confined { try Confinement.confine(.vmm, largestFile: largestFile, descriptors: machine.descriptorLimit) }
                guestStarts?()
            } : nil)
        }
    }

    /// Stops the machine (if it still runs), waits for it, and returns how its run ended.
    @discardableResult
    public func stop() -> Result<MachineRunReport, SwiftletError> {
        machine.stop()
        return wait()
    }

    /// Waits for the machine to stop by itself, and returns how its run ended.
    @discardableResult
    public func wait() -> Result<MachineRunReport, SwiftletError> { worker.wait() }
}

/// Stops a machine when the time is up, unless cancelled first.
final class Watchdog: Sendable {
    private final class Flag: Sendable {
        let value = Atomic<Bool>(false)
    }
    private let cancelled: EventFD
    private let flag = Flag()
    private let thread: WorkerThread<Void>?

    init(milliseconds: Int?, onTimeout: @escaping @Sendable () -> Void) throws(SwiftletError) {
        cancelled = try EventFD(nonBlocking: true)
        guard let milliseconds else { thread = nil; return }
        let fd = cancelled.rawValue, flag = flag
        thread = try WorkerThread(name: "timeout") { () throws(SwiftletError) in
            if try Poll.waitReadable(fd, timeoutMilliseconds: milliseconds) { return }
            flag.value.store(true, ordering: .releasing)
            onTimeout()
        }
    }

    var fired: Bool { flag.value.load(ordering: .acquiring) }

    func cancel() {
        cancelled.signal()
        thread?.wait()
    }
}

/// The guest console when nobody watches it: kept in an unlinked temporary file so a failed
/// boot can show how it ended.
final class ConsoleLog: Sendable {
    private let file: OwnedFileDescriptor
    var fd: Int32 { file.rawValue }

    init?() {
        guard let file = try? OwnedFileDescriptor.unlinkedTemporaryFile(in: "/tmp", prefix: "swiftlet-console") else { return nil }
        self.file = file
    }

    /// The last lines of the console, framed for a terminal.
    func tail(lines: Int = 30) -> String? {
        let size = lseek(fd, 0, SEEK_END)
        let start = max(0, size - 16384)
        guard let bytes = try? file.read(count: Int(size - start), at: UInt64(start), what: "the guest console"), !bytes.isEmpty else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        let tail = text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
        return "--- guest console (last lines) ---\n" + tail + "\n---\n"
    }
}
