import ArgumentParser
import Glibc
import SwiftletKit
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
        let forwarded = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH]
        for signal in forwarded { Glibc.signal(signal, SIG_DFL) }
        Glibc.signal(SIGPIPE, SIG_IGN)
        let signals = try? SignalFD(blocking: forwarded)
        defer { withExtendedLifetime(signals) {} }
        var spec = Machines.Command(command)
        spec.environment = options.environment
        spec.workingDirectory = options.workdir
        spec.user = options.user
        spec.terminal = options.tty
        spec.ignoringEntrypoint = shell
        let terminal = TerminalSession(enabled: options.tty && isatty(0) == 1)
        defer { terminal.restore() }
        let io = CommandRun.IO(input: options.interactive || options.tty ? 0 : nil, signals: signals?.rawValue,
                               windowSize: terminal.enabled ? { @Sendable in RawTerminal.size(of: 0) } : nil,
                               beforeCommand: { terminal.makeRaw() })
        let outcome = try exitingOnFailure { () throws(CommandRun.Failure) in
            defer { terminal.restore() }
            return try Machines.exec(machine.value, spec, io: io)
        }
        if let failure = outcome.failure { printError(failure) }
        throw ExitCode(outcome.status)
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
                    try Machines.copy(source, into: name, at: path)
                } else if let (name, path) = Self.machinePath(source) {
                    try Machines.copy(path, outOf: name, to: destination)
                }
            }
        }
    }
}
