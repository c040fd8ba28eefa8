import Devices
import SwiftletSystem

/// The VMM's main-thread loop while the guest runs: forwards console input to the UART, flushes
/// partial console lines, and returns when the machine stops.
struct ConsoleIOLoop {
    let console: ConsoleOutput
    let input: Int32?
    let serial: Serial8250
    let controller: MachineController

    /// How long a partial line (a shell prompt, say) may wait before it is written out.
    static let flushIntervalMilliseconds: Int32 = 20

    func run() {
        guard let epoll = try? Epoll() else { waitForStop(); return }
        try? epoll.add(controller.stopEventDescriptor, .readable)
        var inputOpen = false
        if let input {
            if (try? epoll.add(input, .readable)) != nil {
                inputOpen = true
            } else {
                pumpRegularFile(input) // epoll refuses regular files: read them whole
            }
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !controller.isStopping {
            let timeout = console.hasPendingOutput ? Self.flushIntervalMilliseconds : -1
            let events = epoll.wait(timeoutMilliseconds: timeout, maximum: 4)
            console.flush()
            for event in events where inputOpen && event.fd == input {
                let count: Int
                do throws(SwiftletError) {
                    count = try buffer.withMutableBytes { raw throws(SwiftletError) in
                        try OwnedFileDescriptor.readSome(fd: event.fd, into: raw, what: "the console input")
                    }
                } catch where error.cause == .resourceTemporarilyUnavailable {
                    continue
                } catch {
                    count = 0 // an input that fails ends as if at its end
                }
                if count > 0 {
                    serial.receive(buffer[0..<count])
                } else {
                    epoll.remove(event.fd) // end of input
                    inputOpen = false
                }
            }
        }
    }

    private func pumpRegularFile(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = (try? buffer.withMutableBytes { raw throws(SwiftletError) in
                try OwnedFileDescriptor.readSome(fd: fd, into: raw, what: "the console input")
            }) ?? 0
            guard count > 0 else { return }
            serial.receive(buffer[0..<count])
        }
    }

    private func waitForStop() {
        while !controller.isStopping { _ = try? Poll.waitReadable(controller.stopEventDescriptor) }
    }
}
