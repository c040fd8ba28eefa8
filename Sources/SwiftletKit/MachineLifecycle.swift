import Glibc
import SwiftletNet
import SwiftletSystem

/// Starting a machine's VMM process, talking to it, and stopping it.
enum MachineLifecycle {
    /// A VMM process being started (`swiftlet machine serve`), in a session of its own; it says
    /// `ready` on a pipe once the guest agent answers, or why it could not start.
    final class Launch {
        let directory: MachineDirectory
        let pid: pid_t
        let answer: OwnedFileDescriptor

        /// Starts the process; `from`: the snapshot to restore instead of booting, `diffable`:
        /// whether the restored machine tracks its writes for a diff snapshot of that snapshot.
        init(_ directory: MachineDirectory, from snapshot: String? = nil, diffable: Bool = false) throws(SwiftletError) {
            let ends = try OwnedFileDescriptor.pipe()
            var arguments = ["swiftlet"] + MachineServer.invocation + [directory.name]
            if let snapshot { arguments += ["--from", snapshot] + (diffable ? ["--diffable"] : []) }
            let writeEnd = ends.writeEnd, readEnd = ends.readEnd
            pid = try spawnChild(MachineServer.executable, arguments: arguments,
                                 output: .descriptor(writeEnd.rawValue), error: .file(directory.logPath), newSession: true,
                                 what: "the machine's VMM process")
            // Closed here only after the spawn (a noncopyable value may end at its last use), so
            // the answer's reader sees its end when the VMM process's stdout goes.
            withExtendedLifetime(writeEnd) {}
            self.directory = directory
            self.answer = readEnd
        }

        /// Starts the process for a machine arriving by migration: it listens on `listener` (its
        /// standard input) for a source holding `token` (passed in its environment, which it
        /// clears), at most `timeoutMilliseconds`.
        init(_ directory: MachineDirectory, receiving listener: Int32, token: String, timeoutMilliseconds: Int) throws(SwiftletError) {
            let ends = try OwnedFileDescriptor.pipe()
            let arguments = ["swiftlet"] + MachineServer.invocation + [directory.name, "--receive", "\(timeoutMilliseconds)"]
            let writeEnd = ends.writeEnd, readEnd = ends.readEnd
            pid = try spawnChild(MachineServer.executable, arguments: arguments,
                                 environment: currentEnvironment() + [MachineServer.Receiving.tokenVariable + "=" + token],
                                 input: .descriptor(listener), output: .descriptor(writeEnd.rawValue), error: .file(directory.logPath),
                                 newSession: true, what: "the machine's VMM process")
            withExtendedLifetime(writeEnd) {}
            self.directory = directory
            self.answer = readEnd
        }

        /// Waits for the process's answer; the process is killed if it gives none in time.
        func waitUntilReady(milliseconds: Int) throws(SwiftletError) {
            let text = Self.readAll(answer.rawValue, milliseconds: milliseconds).map(trimmed)
            if text == "ready" { return }
            guard let text else {
                ChildProcess.signal(pid, SIGKILL)
                throw SwiftletError(.guestFailure, "machine \(directory.name) was not ready within \(formatDuration(milliseconds)); its console is in \(directory.consolePath)")
            }
            ChildProcess.wait(pid)
            if text.hasPrefix("error: ") { throw SwiftletError(.guestFailure, String(text.dropFirst(7))) }
            throw SwiftletError(.guestFailure, "the machine's VMM process ended before the machine was ready:\n" + directory.logTail())
        }

        /// Everything readable from `fd` until its end; nil if it does not end in time.
        static func readAll(_ fd: Int32, milliseconds: Int) -> String? {
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 4096)
            let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
            while true {
                guard let ready = try? Poll.wait([fd], deadline: deadline) else { return nil }
                guard ready[0] else { return nil }
                let count = (try? chunk.withMutableBytes { raw throws(SwiftletError) in
                    try OwnedFileDescriptor.readSome(fd: fd, into: raw, what: "the VMM process's answer")
                }) ?? 0
                if count <= 0 { return String(decoding: bytes, as: UTF8.self) }
                bytes += chunk[0..<count]
                // The answer is one line; the process goes on running with the pipe redirected.
                if bytes.contains(0x0A) { return String(decoding: bytes, as: UTF8.self) }
            }
        }
    }

    /// Sends one request and returns the reply; a clear error when the machine does not run.
    /// `passing`: descriptors that go with the request (an `exec`'s streams).
    static func request(_ directory: MachineDirectory, _ request: ControlRequest, passing fds: [Int32] = []) throws(SwiftletError) -> ControlReply {
        let channel = try connect(directory)
        try channel.send(request, passing: fds)
        guard let (reply, fds) = try channel.receive(ControlReply.self) else {
            throw SwiftletError(.guestFailure, "machine \(directory.name)'s VMM process closed the control connection without answering")
        }
        _ = OwnedFileDescriptors(taking: fds)
        if let error = reply.error { throw SwiftletError(.invalidArgument, error) }
        return reply
    }

    static func connect(_ directory: MachineDirectory) throws(SwiftletError) -> ControlChannel {
        _ = try directory.record()
        if let channel = ControlChannel.connect(directory.socketPath) { return channel }
        switch directory.state {
        case .running: throw SwiftletError(.invalidArgument, "machine \(directory.name) is starting or not answering on \(directory.socketPath)")
        case .crashed(let pid): throw SwiftletError(.guestFailure, crashReport(directory, pid: pid))
        case .stopped: throw SwiftletError(.invalidArgument, "machine \(directory.name) is not running: start it with `swiftlet machine start \(directory.name)`")
        }
    }

    static func crashReport(_ directory: MachineDirectory, pid: Int32) -> String {
        let tail = directory.logTail()
        return "machine \(directory.name) crashed: its VMM process (pid \(pid)) ended without stopping the machine"
            + (tail.isEmpty ? "" : "; its log (\(directory.logPath)) ends:\n" + tail)
    }

    /// Stops the machine: a clean shutdown, by force after `timeoutMilliseconds`; waits until its
    /// VMM process has ended (killing it if it does not end on its own).
    /// Returns what happened, for the user.
    @discardableResult
    static func stop(_ directory: MachineDirectory, timeoutMilliseconds: Int) throws(SwiftletError) -> String {
        switch directory.state {
        case .stopped:
            return "machine \(directory.name) is not running"
        case .crashed(let pid):
            unlink(directory.pidPath)
            unlink(directory.socketPath)
            return crashReport(directory, pid: pid)
        case .running(let pid):
            var request = ControlRequest(.stop)
            request.timeoutMilliseconds = timeoutMilliseconds
            let asked = (try? Self.request(directory, request)) != nil
            // The VMM process releases the lock as it exits.
            if !waitUntilStopped(directory, milliseconds: asked ? timeoutMilliseconds + 10_000 : 0), pid > 0 {
                ChildProcess.signal(pid, SIGKILL)
                guard waitUntilStopped(directory, milliseconds: 5_000) else {
                    throw SwiftletError(.systemCall, "machine \(directory.name)'s VMM process (pid \(pid)) did not end")
                }
                unlink(directory.pidPath)
                unlink(directory.socketPath)
                try? OwnedFileDescriptor.writeSmallFileAtomically(directory.lastExitPath, Array("killed: the VMM process did not stop\n".utf8))
            }
            return "machine \(directory.name) " + (directory.lastExit ?? "stopped")
        }
    }

    static func waitUntilStopped(_ directory: MachineDirectory, milliseconds: Int) -> Bool {
        let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
        while true {
            if case .running = directory.state {} else { return true }
            if MonotonicClock.now >= deadline { return false }
            usleep(10_000)
        }
    }
}

/// What `status` and `ls` show.
public struct MachineSummary: Codable, Sendable {
    public var name: String
    public var state: String
    public var image: String
    public var cpus: Int
    public var memoryMiB: Int
    public var diskMiB: Int
    public var pid: Int32?
    public var uptimeMilliseconds: Int?
    public var lastExit: String?
    public var problem: String?
    /// The outbound policy: "none" (no network device), "open", "allow NAME, CIDR, ..." or
    /// "inbound only" (published ports and nothing out).
    public var network: String
    /// The published ports, as `-p` takes them.
    public var ports: [String]
    /// While it runs: the host memory its VMM process holds now (resident, guest memory included).
    public var hostMemoryMiB: Int?
    /// While it runs with a balloon: the memory its guest is asked to keep (`machine memory`),
    /// and what the guest has handed over to the balloon so far.
    public var memoryTargetMiB: Int?
    public var balloonMiB: Int?
    /// Host directories its guest sees, as `-v` takes them (HOST:GUEST[:ro]).
    public var volumes: [String]

    init(_ directory: MachineDirectory, record: MachineRecord) {
        name = record.name; image = record.source; cpus = record.cpus; memoryMiB = record.memoryMiB; diskMiB = record.diskMiB
        network = {
            guard let policy = record.network, policy.hasNetwork else { return "none" }
            var outbound = policy
            outbound.published = []
            return outbound.hasNetwork ? outbound.summary : "inbound only"
        }()
        ports = record.network?.published.map(\.description) ?? []
        volumes = (record.volumes ?? []).map(\.description)
        lastExit = directory.lastExit
        switch directory.state {
        case .stopped: state = "stopped"
        case .crashed(let pid):
            state = "crashed"
            problem = MachineLifecycle.crashReport(directory, pid: pid)
        case .running(let pid):
            self.pid = pid
            if let reply = try? MachineLifecycle.request(directory, ControlRequest(.status)) {
                state = reply.state ?? "running"
                uptimeMilliseconds = reply.uptimeMilliseconds
                hostMemoryMiB = reply.residentKiB.map { $0 >> 10 }
                memoryTargetMiB = reply.memory.map { Int($0.targetBytes >> 20) }
                balloonMiB = reply.memory.map { Int($0.balloonBytes >> 20) }
            } else {
                state = "starting"
            }
        }
    }
}

/// `milliseconds` as the user would write it (120s, 1.5s, 500ms).
func formatDuration(_ milliseconds: Int) -> String {
    milliseconds % 1000 == 0 ? "\(milliseconds / 1000)s" : milliseconds > 1000 ? "\(Double(milliseconds) / 1000)s" : "\(milliseconds)ms"
}
