import CLinux
import Devices
import Glibc
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
        let epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epfd >= 0 else { waitForStop(); return }
        defer { close(epfd) }
        add(epfd, controller.stopEventDescriptor)
        var inputOpen = false
        if let input {
            if add(epfd, input) {
                inputOpen = true
            } else {
                pumpRegularFile(input) // epoll refuses regular files: read them whole
            }
        }
        var events = [epoll_event](repeating: epoll_event(), count: 4)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !controller.isStopping {
            let timeout = console.hasPendingOutput ? Self.flushIntervalMilliseconds : -1
            let n = events.withUnsafeMutableBufferPointer { epoll_wait(epfd, $0.baseAddress, 4, timeout) }
            if n < 0 && errno != EINTR { break }
            console.flush()
            guard n > 0 else { continue }
            for event in events[0..<Int(n)] where inputOpen && event.data.fd == input {
                let count = buffer.withUnsafeMutableBytes { read(input!, $0.baseAddress, $0.count) }
                if count > 0 {
                    serial.receive(buffer[0..<count])
                } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                    epoll_ctl(epfd, EPOLL_CTL_DEL, input!, nil) // end of input
                    inputOpen = false
                }
            }
        }
    }

    @discardableResult
    private func add(_ epfd: Int32, _ fd: Int32) -> Bool {
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.fd = fd
        return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) == 0
    }

    private func pumpRegularFile(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { return }
            serial.receive(buffer[0..<count])
        }
    }

    private func waitForStop() {
        var value: UInt64 = 0
        while !controller.isStopping { _ = read(controller.stopEventDescriptor, &value, 8) }
    }
}
