import ArgumentParser
import CLinux
import Glibc
import SwiftletSystem

extension MachineCommand {
    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a command in a running machine and return its output and exit status.",
            discussion: """
                Runs as `swiftlet run` does (the image's entrypoint, environment, working directory and \
                user, with -e, -w and -u over them), beside any other command in the machine.
                """)

        @OptionGroup var machine: MachineNameOptions
        @OptionGroup var command: MachineCommandOptions

        func run() throws {
            try MachineCommandOptions.execute(in: machine, command: command.command, options: command, shell: false)
        }
    }

    struct Shell: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Open an interactive shell (/bin/sh) in a running machine.")

        @OptionGroup var machine: MachineNameOptions

        @Option(name: .shortAndLong, help: ArgumentHelp("Set an environment variable (KEY=VALUE). Repeatable.", valueName: "key=value"))
        var env: [String] = []

        @Option(name: .shortAndLong, help: "User to run as: name, uid, or uid:gid.")
        var user: String?

        func run() throws {
            var options = try MachineCommandOptions.parse(["-i"] + (isatty(0) == 1 ? ["-t"] : []))
            options.env = env
            options.user = user
            try MachineCommandOptions.execute(in: machine, command: ["/bin/sh"], options: options, shell: true)
        }
    }
}

/// `exec`'s flags, as `run` has them.
struct MachineCommandOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: ArgumentHelp("Set an environment variable (KEY=VALUE, or KEY to pass the host's). Repeatable.", valueName: "key=value"))
    var env: [String] = []

    @Option(name: [.customShort("w"), .long], help: "Working directory inside the machine.")
    var workdir: String?

    @Option(name: .shortAndLong, help: "User to run as: name, uid, or uid:gid.")
    var user: String?

    @Flag(name: .shortAndLong, help: "Pass standard input to the command.")
    var interactive = false

    @Flag(name: .shortAndLong, help: "Give the command a terminal.")
    var tty = false

    @Argument(parsing: .postTerminator, help: "The command and its arguments (default: the image's).")
    var command: [String] = []

    func validate() throws {
        for variable in env where variable.isEmpty || variable.hasPrefix("=") {
            throw ValidationError("-e \(variable): expected KEY=VALUE or KEY")
        }
    }

    /// Runs the command in the machine's VMM process, with this process's standard streams
    /// passed to it, and exits with the command's status.
    static func execute(in machine: MachineNameOptions, command: [String], options: MachineCommandOptions, shell: Bool) throws {
        var forwarded = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]
        for signal in forwarded { Glibc.signal(signal, SIG_DFL) }
        Glibc.signal(SIGPIPE, SIG_IGN)
        let signals = swiftlet_signalfd(&forwarded, Int32(forwarded.count))

        let (channel, prepared) = try exitingOnSetupFailure { () throws(SwiftletError) -> (ControlChannel, ControlRequest) in
            let directory = try machine.directory()
            let record = try directory.record()
            let environment = options.env.compactMap { variable in
                variable.contains("=") ? variable : getenv(variable).map { variable + "=" + String(cString: $0) }
            }
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
