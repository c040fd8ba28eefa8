import Glibc
import SwiftletSystem

extension Machines {
    /// A command to run in a machine, over its image's defaults (entrypoint, environment,
    /// working directory, user).
    public struct Command: Sendable {
        /// The command and its arguments (empty: the image's default command).
        public var arguments: [String]
        /// KEY=VALUE over the image's environment.
        public var environment: [String] = []
        public var workingDirectory: String?
        public var user: String?
        /// Give the command a terminal.
        public var terminal = false
        /// Run `arguments` as they are, without the image's entrypoint (a shell).
        public var ignoringEntrypoint = false

        public init(_ arguments: [String]) {
            self.arguments = arguments
        }
    }

    /// How a command in a machine ended: its exit status (128 + N after signal N), and the agent's
    /// word when it could not start it (126, 127).
    public struct ExecOutcome: Sendable, Equatable {
        public var status: Int32
        public var failure: String?
    }

    /// Runs `command` in the running machine beside any other, with `io`'s descriptors as its
    /// standard streams (passed to the machine's VMM process), and waits for it. Signals read from
    /// `io.signals` are forwarded (SIGWINCH: the new `io.windowSize()`, with a terminal).
    public static func exec(_ name: String, _ command: Command, io: CommandRun.IO) throws(CommandRun.Failure) -> ExecOutcome {
        func setup<T>(_ body: () throws(SwiftletError) -> T) throws(CommandRun.Failure) -> T {
            do { return try body() } catch { throw CommandRun.Failure.setup(error) }
        }
        let (channel, prepared) = try setup { () throws(SwiftletError) -> (ControlChannel, ControlRequest) in
            let directory = try MachineDirectory(name: name)
            let record = try directory.record()
            var defaults = record.defaults
            if command.ignoringEntrypoint { defaults.entrypoint = [] }
            let exec = try defaults.request(command: command.arguments, environment: command.environment, workdir: command.workingDirectory,
                                            user: command.user, what: "machine \(record.name)")
            var request = ControlRequest(.exec)
            request.arguments = exec.arguments
            request.environment = exec.environment
            request.workingDirectory = exec.workingDirectory
            request.user = exec.user
            request.terminal = command.terminal
            request.input = io.input != nil
            return (try MachineLifecycle.connect(directory), request)
        }
        var request = prepared
        io.beforeCommand()
        if command.terminal, let size = io.windowSize?() {
            request.rows = size.rows
            request.columns = size.columns
        }
        let passed: [Int32] = (io.input.map { [$0] } ?? []) + [io.output, io.error]
        try setup { () throws(SwiftletError) in try channel.send(request, passing: passed) }

        while true {
            if !channel.hasBufferedMessage {
                let ready = try setup { () throws(SwiftletError) in try Poll.wait([channel.fd, io.signals ?? -1]) }
                if ready[1], let signals = io.signals {
                    while let signal = SignalFD.next(from: signals) {
                        var control = ExecControl()
                        if signal == SIGWINCH {
                            guard command.terminal, let size = io.windowSize?() else { continue }
                            control.rows = size.rows
                            control.columns = size.columns
                        } else {
                            control.signal = signal
                        }
                        try? channel.send(control)
                    }
                }
                guard ready[0] else { continue }
            }
            let received = try setup { () throws(SwiftletError) in try channel.receive(ControlReply.self) }
            guard let (reply, fds) = received else {
                throw CommandRun.Failure(reason: .guest, message: "the machine stopped while the command ran")
            }
            _ = OwnedFileDescriptors(taking: fds)
            if let error = reply.error { throw CommandRun.Failure(reason: .setup, message: error) }
            return ExecOutcome(status: reply.status ?? ExitStatus.setupFailed, failure: reply.failure)
        }
    }

    /// Copies the host file `source` to `path` in the running machine (through `cat`, as root).
    public static func copy(_ source: String, into name: String, at path: String) throws(SwiftletError) {
        let input = try OwnedFileDescriptor.openInput(source, role: "file to copy")
        guard try input.isRegularFile() else { throw SwiftletError(.invalidArgument, "\(source) is not a regular file") }
        try copyExec(name, ["sh", "-c", "cat > \"$1\"", "sh", path], input: input.rawValue, output: nil)
        withExtendedLifetime(input) {} // a noncopyable value may end at its last use: keep the descriptor open until sent
    }

    /// Copies `path` in the running machine to the host path `destination` (into it, when it is a
    /// directory); the file appears there only once complete.
    public static func copy(_ path: String, outOf name: String, to destination: String) throws(SwiftletError) {
        var target = destination
        var info = stat()
        if stat(target, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR {
            target += "/" + (path.split(separator: "/").last.map(String.init) ?? "file")
        }
        // A private temporary file beside the target (O_EXCL, mode 0600: a symbolic link planted
        // there is never followed), renamed over it once complete.
        try OwnedFileDescriptor.writeIntoPlace(target) { output throws(SwiftletError) in
            try copyExec(name, ["cat", path], input: nil, output: output.rawValue)
        }
    }

    /// Runs `arguments` as root in / with the given streams (error: this process's stderr).
    private static func copyExec(_ name: String, _ arguments: [String], input: Int32?, output: Int32?) throws(SwiftletError) {
        var request = ControlRequest(.exec)
        request.arguments = arguments
        request.environment = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        request.input = input != nil
        let null = try OwnedFileDescriptor.open("/dev/null", flags: O_WRONLY)
        let reply = try MachineLifecycle.request(try MachineDirectory(name: name), request,
                                                 passing: (input.map { [$0] } ?? []) + [output ?? null.rawValue, 2])
        withExtendedLifetime(null) {}
        guard reply.status == 0 else {
            throw SwiftletError(.guestFailure, "the copy failed in machine \(name) (status \(reply.status ?? -1))" + (reply.failure.map { ": " + $0 } ?? ""))
        }
    }
}
