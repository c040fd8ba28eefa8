import ArgumentParser
import CLinux
import Glibc
import SwiftletSystem

extension MachineCommand {
    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "exec",
            abstract: "Run a command in a running machine and return its output and exit status.",
            discussion: """
                Runs as `swiftlet run` does (the image's entrypoint, environment, working directory and \
                user, with -e, -w and -u over them), beside any other command in the machine.
                """)

        @OptionGroup var machine: MachineNameOptions
        @OptionGroup var command: CommandOptions

        func run() throws {
            try CommandOptions.execute(in: machine, command: command.command, options: command, shell: false)
        }
    }

    struct Shell: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "shell", abstract: "Open an interactive shell (/bin/sh) in a running machine.")

        @OptionGroup var machine: MachineNameOptions

        @Option(name: .shortAndLong, help: ArgumentHelp("Set an environment variable (KEY=VALUE). Repeatable.", valueName: "key=value"))
        var env: [String] = []

        @Option(name: .shortAndLong, help: "User to run as: name, uid, or uid:gid.")
        var user: String?

        func run() throws {
            var options = try CommandOptions.parse(["-i"] + (isatty(0) == 1 ? ["-t"] : []))
            options.env = env
            options.user = user
            try CommandOptions.execute(in: machine, command: ["/bin/sh"], options: options, shell: true)
        }
    }
}

/// How a command runs, for `run` and `machine exec`: over the image's defaults, and its streams.
struct CommandOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: ArgumentHelp("Set an environment variable (KEY=VALUE, or KEY to pass the host's). Repeatable.", valueName: "key=value"))
    var env: [String] = []

    @Option(name: [.customShort("w"), .long], help: "Working directory inside the VM (default: the image's, else /).")
    var workdir: String?

    @Option(name: .shortAndLong, help: "User to run as: name, uid, or uid:gid (default: the image's, else root).")
    var user: String?

    @Flag(name: .shortAndLong, help: "Pass standard input to the command.")
    var interactive = false

    @Flag(name: .shortAndLong, help: "Give the command a terminal (the host's terminal goes raw while it runs).")
    var tty = false

    @Argument(parsing: .postTerminator, help: "The command and its arguments (default: the image's, else sh).")
    var command: [String] = []

    func validate() throws {
        for variable in env where variable.isEmpty || variable.hasPrefix("=") {
            throw ValidationError("-e \(variable): expected KEY=VALUE or KEY")
        }
    }

    /// `-e` values: KEY=VALUE as given, KEY alone from the host's environment (skipped if unset).
    var environment: [String] {
        env.compactMap { variable in
            if variable.contains("=") { return variable }
            return getenv(variable).map { variable + "=" + String(cString: $0) }
        }
    }

    /// Runs the command in the machine's VMM process, with this process's standard streams
    /// passed to it, and exits with the command's status.
    static func execute(in machine: MachineNameOptions, command: [String], options: CommandOptions, shell: Bool) throws {
        var forwarded = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]
        for signal in forwarded { Glibc.signal(signal, SIG_DFL) }
        Glibc.signal(SIGPIPE, SIG_IGN)
        let signals = swiftlet_signalfd(&forwarded, Int32(forwarded.count))

        let (channel, prepared) = try exitingOnSetupFailure { () throws(SwiftletError) -> (ControlChannel, ControlRequest) in
            let directory = try machine.directory()
            let record = try directory.record()
            let environment = options.environment
            var defaults = record.defaults
            if shell { defaults.entrypoint = [] }
            let exec = try defaults.request(command: command, environment: environment, workdir: options.workdir, user: options.user,
                                            what: "machine \(record.name)")
            var request = ControlRequest(.exec)
            request.arguments = exec.arguments
            request.environment = exec.environment
            request.workingDirectory = exec.workingDirectory
            request.user = exec.user
            request.terminal = options.tty
            request.input = options.interactive || options.tty
            return (try MachineLifecycle.connect(directory), request)
        }
        var request = prepared
        var terminal: RawTerminal?
        if options.tty && isatty(0) == 1 {
            terminal = RawTerminal(fd: 0)
            let size = RawTerminal.size(of: 0) ?? (24, 80)
            request.rows = size.0
            request.columns = size.1
        }
        defer { terminal?.restore() }
        let passed: [Int32] = (request.input == true ? [0] : []) + [1, 2]
        try exitingOnSetupFailure { () throws(SwiftletError) in try channel.send(request, passing: passed) }

        while true {
            var fds = [pollfd(fd: channel.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: signals, events: Int16(POLLIN), revents: 0)]
            if !channel.hasBufferedMessage {
                let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t(signals >= 0 ? 2 : 1), -1) }
                if n < 0 { if errno == EINTR { continue }; break }
            } else {
                fds[0].revents = Int16(POLLIN)
            }
            if fds[1].revents != 0 {
                while case let signal = swiftlet_read_signal(signals), signal > 0 {
                    var control = ExecControl()
                    if signal == SIGWINCH {
                        guard terminal != nil, let size = RawTerminal.size(of: 0) else { continue }
                        control.rows = size.0
                        control.columns = size.1
                    } else {
                        control.signal = signal
                    }
                    try? channel.send(control)
                }
            }
            if fds[0].revents != 0 {
                let received: (ControlReply, [Int32])?
                do { received = try channel.receive(ControlReply.self) } catch {
                    terminal?.restore()
                    printError(error.description)
                    throw ExitCode(Status.setupFailed)
                }
                terminal?.restore()
                guard let (reply, fds) = received else {
                    printError("the machine stopped while the command ran")
                    throw ExitCode(Status.guestCrashed)
                }
                fds.forEach { close($0) }
                if let error = reply.error {
                    printError(error)
                    throw ExitCode(Status.setupFailed)
                }
                if let failure = reply.failure { printError(failure) }
                throw ExitCode(reply.status ?? Status.setupFailed)
            }
        }
        throw ExitCode(Status.setupFailed)
    }
}

extension MachineCommand {
    struct Copy: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cp",
            abstract: "Copy a file between the host and a running machine (NAME:PATH names the machine's side).",
            discussion: """
                  swiftlet machine cp ./app.conf web:/etc/app.conf
                  swiftlet machine cp web:/var/log/app.log ./app.log

                The copy runs `cat` in the machine (as root), so the image needs `sh` and `cat`. A copy \
                out of the machine appears at the host path only once complete.
                """)

        @Argument(help: "The source: a host path or NAME:PATH.")
        var source: String

        @Argument(help: "The destination: a host path or NAME:PATH.")
        var destination: String

        /// NAME:PATH split, when `text` names a machine's file.
        static func machinePath(_ text: String) -> (name: String, path: String)? {
            guard let colon = text.firstIndex(of: ":"), !text.hasPrefix("/"), !text.hasPrefix(".") else { return nil }
            let name = String(text[..<colon]), path = String(text[text.index(after: colon)...])
            guard (try? MachineDirectory.validate(name: name)) != nil, path.hasPrefix("/") else { return nil }
            return (name, path)
        }

        func validate() throws {
            switch (Self.machinePath(source), Self.machinePath(destination)) {
            case (nil, nil): throw ValidationError("one side must be a machine's absolute path, NAME:/PATH")
            case (.some, .some): throw ValidationError("copy between a machine and the host: one side must be a host path")
            default: break
            }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                if let (name, path) = Self.machinePath(destination) {
                    let input = try OwnedFileDescriptor.openInput(source, role: "file to copy")
                    guard try input.isRegularFile() else { throw SwiftletError(.invalidArgument, "\(source) is not a regular file") }
                    try Self.exec(name, ["sh", "-c", "cat > \"$1\"", "sh", path], input: input.rawValue, output: nil)
                } else if let (name, path) = Self.machinePath(source) {
                    var target = destination
                    var info = stat()
                    if stat(target, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR {
                        target += "/" + (path.split(separator: "/").last.map(String.init) ?? "file")
                    }
                    let temporary = target + ".swiftlet-cp"
                    let output = try OwnedFileDescriptor.open(temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644, what: temporary)
                    do throws(SwiftletError) {
                        try Self.exec(name, ["cat", path], input: nil, output: output.rawValue)
                    } catch {
                        unlink(temporary)
                        throw error
                    }
                    guard rename(temporary, target) == 0 else { throw SwiftletError.system("cannot rename \(temporary) to \(target)", errno: currentErrno) }
                }
            }
        }

        /// Runs `arguments` as root in / with the given streams (error: this process's stderr).
        static func exec(_ name: String, _ arguments: [String], input: Int32?, output: Int32?) throws(SwiftletError) {
            var request = ControlRequest(.exec)
            request.arguments = arguments
            request.environment = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
            request.input = input != nil
            let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
            defer { close(null) }
            let reply = try MachineLifecycle.request(try MachineDirectory(name: name), request,
                                                     passing: (input.map { [$0] } ?? []) + [output ?? null, 2])
            guard reply.status == 0 else {
                throw SwiftletError(.guestFailure, "the copy failed in machine \(name) (status \(reply.status ?? -1))" + (reply.failure.map { ": " + $0 } ?? ""))
            }
        }
    }
}
