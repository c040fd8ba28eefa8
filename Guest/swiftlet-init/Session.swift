import AgentProtocol
import CGuestSupport
import Glibc

/// Serves the host's connection: runs each command it asks for, one at a time, forwarding its
/// input, output, signals and window size, and reports how it ended. Also reaps every orphan
/// (the agent is PID 1). Returns when the host closes the connection, or when the connection
/// breaks (the machine was restored from a snapshot: its vsock connections were reset).
struct Session {
    private(set) var connection: Int32
    var reader = AgentFrameReader()
    var command: RunningCommand?
    /// Host input not yet taken by the command.
    var pendingInput: [UInt8] = []
    var inputClosed = false
    let signals: Int32
    /// Opens a new connection to the host (for `openSession`).
    let connect: () -> Int32
    /// The machine's agent key: the first one the host sent (on the machine's first session, at
    /// boot), kept for the agent's life. It lives only in the memory of the agent's processes,
    /// which a snapshot keeps and no other unprivileged guest process can read.
    var key: [UInt8]?

    init(connection: Int32, connect: @escaping () -> Int32, key: [UInt8]? = nil) {
        self.connection = connection
        self.connect = connect
        self.key = key
        guest_block_signal(SIGCHLD)
        signals = guest_signalfd(SIGCHLD)
        send(.ready(version: AgentMessage.version))
    }

    enum Ending: Equatable {
        /// The host closed the connection: it is done with this machine.
        case hostClosed
        /// The connection broke under the agent (a transport reset): the host is still there.
        case connectionLost
        /// The host sent what the agent cannot read.
        case protocolError
    }

    /// Serves a new connection after the old one was lost; the command that was running (its
    /// streams went with the old connection) is ended.
    mutating func reconnect(_ newConnection: Int32) {
        stopCommand()
        if let c = command {
            for fd in Set([c.input, c.output, c.error].compactMap({ $0 })) { close(fd) }
            command = nil // reaped like any orphan
        }
        close(connection)
        connection = newConnection
        reader = AgentFrameReader()
        pendingInput = []
        inputClosed = false
        send(.ready(version: AgentMessage.version))
    }

    mutating func run() -> Ending {
        var buffer = [UInt8](repeating: 0, count: 32 << 10)
        while true {
            var fds = [pollfd(fd: connection, events: Int16(POLLIN), revents: 0), pollfd(fd: signals, events: Int16(POLLIN), revents: 0)]
            if let c = command {
                if let output = c.output { fds.append(pollfd(fd: output, events: Int16(POLLIN), revents: 0)) }
                if let error = c.error { fds.append(pollfd(fd: error, events: Int16(POLLIN), revents: 0)) }
                if let input = c.input, !pendingInput.isEmpty {
                    fds.append(pollfd(fd: input, events: Int16(POLLOUT), revents: 0))
                }
            }
            let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), -1) }
            if ready < 0 { if errno == EINTR { continue }; Log.fatal("poll failed: \(String(cString: strerror(errno)))") }
            for fd in fds where fd.revents != 0 {
                if fd.fd == connection {
                    let n = buffer.withUnsafeMutableBytes { read(connection, $0.baseAddress, $0.count) }
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    if n == 0 { stopCommand(); return .hostClosed }
                    if n < 0 { return .connectionLost }
                    reader.append(buffer[0..<n])
                    do {
                        while let message = try reader.next() { handle(message) }
                    } catch {
                        Log.write("\(error)")
                        stopCommand()
                        return .protocolError
                    }
                } else if fd.fd == signals {
                    while guest_read_signal(signals) > 0 {}
                    reap()
                } else if fd.events == Int16(POLLOUT) {
                    flushInput() // writable, or the command closed its input (the write then fails)
                } else {
                    forwardOutput(fd.fd, buffer: &buffer)
                }
            }
            finishIfDone()
        }
    }

    mutating func handle(_ message: AgentMessage) {
        switch message {
        case .exec(let request):
            guard command == nil else {
                send(.failed(status: 126, message: "a command is already running"))
                return
            }
            pendingInput = []
            inputClosed = false
            switch Spawn.start(request) {
            case .success(let started):
                command = started
                send(.started(pid: started.pid))
            case .failure(let failure):
                send(.failed(status: failure.status, message: failure.message))
            }
        case .stdin(let bytes):
            pendingInput += bytes
            flushInput()
        case .closeStdin:
            inputClosed = true
            flushInput()
        case .signal(let number):
            if let c = command, c.status == nil { kill(-c.pid, number) }
        case .resize(let rows, let columns):
            if let c = command, c.terminal, let output = c.output { guest_set_window_size(output, rows, columns) }
        case .openSession:
            openSession()
        case .identity(let hostname, let seed):
            if !hostname.isEmpty && hostname.withCString({ sethostname($0, strlen($0)) }) != 0 {
                Log.write("cannot set the hostname to \(hostname): \(String(cString: strerror(errno)))")
            }
            let result = seed.withUnsafeBufferPointer { guest_reseed_random($0.baseAddress, Int32($0.count)) }
            if result != 0 { Log.write("cannot reseed the kernel's random generator: \(String(cString: strerror(-result)))") }
        case .agentKey(let bytes):
            if key == nil && bytes.count == AgentAuthentication.keyLength {
                key = bytes
            } else if key != bytes {
                Log.write("ignoring an agent key: the agent keeps the first one it was given")
            }
        case .challenge(let nonce):
            if let key {
                send(.proof(AgentAuthentication.proof(key: key, nonce: nonce)))
            } else {
                send(.failed(status: 1, message: "the agent was given no key to prove"))
            }
        case .mountRoot(let devices):
            if let failure = GuestSetup.rootSwitchRefusal ?? GuestSetup.waitForDisks(devices)
                ?? GuestSetup.switchRoot(to: devices, type: nil, upper: nil) {
                send(.failed(status: 1, message: failure))
            } else {
                send(.rootMounted)
            }
        case .configureNetwork(let setup):
            if let failure = Network.configure(setup) {
                send(.failed(status: 1, message: failure))
            } else {
                send(.networkConfigured)
            }
        case .ready, .started, .stdout, .stderr, .exited, .failed, .rootMounted, .proof, .networkConfigured:
            Log.write("ignoring a host message meant for the host")
        }
    }

    /// Forks a process that serves a new connection to the host, so that the host can run another
    /// command beside this session's. It ends with its connection; the agent reaps it as an orphan.
    func openSession() {
        let pid = fork()
        if pid < 0 { Log.write("cannot fork a session: \(String(cString: strerror(errno)))"); return }
        if pid > 0 { return }
        // The new process must not hold this session's descriptors: a command's input stays open
        // while anyone holds its write end.
        close(connection)
        close(signals)
        if let c = command { for fd in Set([c.input, c.output, c.error].compactMap({ $0 })) { close(fd) } }
        var session = Session(connection: connect(), connect: connect, key: key)
        _ = session.run()
        session.stopCommand()
        exit(0)
    }

    /// Writes pending host input to the command; closes its input once the host's has ended.
    mutating func flushInput() {
        guard let c = command, let input = c.input else { pendingInput = []; return }
        while !pendingInput.isEmpty {
            let n = pendingInput.withUnsafeBytes { write(input, $0.baseAddress, $0.count) }
            if n > 0 { pendingInput.removeFirst(n); continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EAGAIN { return }
            pendingInput = [] // the command closed its input: drop the rest, as a pipe would
            break
        }
        guard inputClosed else { return }
        if c.terminal {
            // A terminal has no half-close: end of input is the EOF character at a line start.
            var eof: UInt8 = 4
            _ = write(input, &eof, 1)
            inputClosed = false
        } else {
            close(input)
            command?.input = nil
        }
    }

    mutating func forwardOutput(_ fd: Int32, buffer: inout [UInt8]) {
        guard let c = command else { return }
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 {
            let bytes = Array(buffer[0..<n])
            send(fd == c.error ? .stderr(bytes) : .stdout(bytes))
            return
        }
        if n < 0 && (errno == EINTR || errno == EAGAIN) { return }
        // End of file (or EIO from a pty whose last holder closed it).
        close(fd)
        if fd == c.output { command?.output = nil; if c.terminal { command?.input = nil } }
        if fd == c.error { command?.error = nil }
    }

    /// Collects every exited child; remembers the command's status.
    mutating func reap() {
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { return }
            if let c = command, pid == c.pid {
                let signal = status & 0x7F
                command?.status = signal == 0 ? (status >> 8) & 0xFF : 128 + signal
            }
        }
    }

    /// Reports the command's end once it has exited and its output is drained.
    mutating func finishIfDone() {
        guard let c = command, let status = c.status, c.output == nil, c.error == nil else { return }
        if let input = c.input { close(input) }
        command = nil
        pendingInput = []
        send(.exited(status: status))
    }

    /// The host is gone: end the command and everything it started.
    mutating func stopCommand() {
        if let c = command, c.status == nil { kill(-c.pid, SIGKILL) }
    }

    func send(_ message: AgentMessage) {
        let frame = AgentFrame.encode(message)
        var done = 0
        while done < frame.count {
            let n = frame.withUnsafeBytes { write(connection, $0.baseAddress! + done, $0.count - done) }
            if n > 0 { done += n } else if n < 0 && errno == EINTR { continue } else { return }
        }
    }
}
