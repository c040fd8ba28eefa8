import ArgumentParser
import Glibc
import Images
import SwiftletSystem

struct Image: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with root filesystem images.",
        subcommands: [Convert.self])

    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Convert a tar archive of a root filesystem (or one image layer) into an EROFS image for --rootfs.",
            discussion: """
                Ownership, modes, device nodes, symlinks, hard links and extended attributes come \
                from the archive: no root needed. OCI whiteouts become overlayfs whiteouts.

                  docker export $(docker create alpine) > alpine.tar
                  swiftlet image convert alpine.tar -o alpine.erofs
                  swiftlet run --rootfs alpine.erofs -- cat /etc/os-release
                """)

        @Argument(help: "An uncompressed tar archive.")
        var archive: String

        @Option(name: .shortAndLong, help: "Where to write the EROFS image.")
        var output: String

        func run() throws {
            do {
                for warning in try LayerConverter.convert(tarPath: archive, to: output) { printError("warning: \(warning)") }
            } catch {
                printError(error.description)
                throw ExitCode(Status.setupFailed)
            }
        }
    }
}
