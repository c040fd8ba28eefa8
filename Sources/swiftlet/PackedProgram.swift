import ArgumentParser
import Glibc
import SwiftletKit
import SwiftletSystem

/// Swiftlet started as a packed program (`swiftlet pack create --executable`): its own file is
/// Swiftlet's static executable with a pack appended. It runs the packed machine's command as
/// `swiftlet run --image ITSELF` would, with `run`'s options and arguments after `--`, and unpacks
/// into a temporary directory (it has no `SWIFTLET_HOME` of its own).
enum PackedProgram {
    /// This program's file when it carries a pack; nil for Swiftlet itself.
    static let path: String? = {
        guard let path = try? FileTree.currentExecutable(), MachinePack.looksLikePack(path) else { return nil }
        return path
    }()

    /// The options that name a machine's root or kernel or run it in the background, which a
    /// packed program does not take: its machine is its own, and it runs in the foreground
    /// (`--cpus` and `--memory` go to `run`, which refuses them for a snapshot's pack).
    static let refused = ["--image", "--rootfs", "--from", "--kernel", "--cold", "-d", "--detach"]

    static func main(path: String, arguments: [String]) -> Never {
        let name = CommandLine.arguments.first.map { String($0.split(separator: "/").last ?? "program") } ?? "program"
        let options = arguments.prefix { $0 != "--" }
        if options.contains("--help") || options.contains("-h") {
            print(help(name: name, path: path))
            Run.exit()
        }
        if let option = options.first(where: { option in refused.contains { option == $0 || option.hasPrefix($0 + "=") } }) {
            printError("\(option): \(name) is a packed machine, which runs its own machine in the foreground (see \(name) --help)")
            Run.exit(withError: ExitCode(64))
        }
        do {
            let command = try Run.parse(["--image", path] + arguments)
            try command.run()
        } catch {
            Run.exit(withError: error)
        }
        Run.exit()
    }

    static func help(name: String, path: String) -> String {
        var parts = ""
        if let (manifest, _, _) = try? MachinePack.inspect(path) {
            let bytes = manifest.parts.reduce(UInt64(0)) { $0 + $1.size }
            parts = " (\(manifest.kind.rawValue), \(manifest.parts.count) parts, \(bytes >> 20) MiB unpacked)"
        }
        return """
            \(name): a machine packed into one program by Swiftlet\(parts).

            It restores the machine where it was packed, runs a command in that fresh copy and
            exits with the command's status; nothing is kept. It needs read and write access to
            /dev/kvm and nothing installed.

            USAGE: \(name) [options] [-- COMMAND [ARG]...]

              (no command)          run the machine's own command
              -- COMMAND [ARG]...   run this instead (after the image's entrypoint, if it has one)
              -i, --interactive     pass standard input to the command
              -t, --tty             give the command a terminal
              -e, --env KEY=VALUE   set an environment variable (repeatable)
              -w, --workdir DIR     run in DIR
              -u, --user USER       run as USER
              --timeout DURATION    stop the machine after DURATION (exit status 124)
              --cpus N, --memory MIB  the machine's shape (a packed image's only)
              --net, --allow-host NAME, --allow-cidr CIDR, -p [IP:]HOST:GUEST
                                    network access, as `swiftlet run` has it (none by default)
              --console             show the guest's console on standard error
            """
    }
}
