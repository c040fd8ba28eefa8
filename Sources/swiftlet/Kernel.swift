import ArgumentParser
import Glibc
import SwiftletKit
import VMM

struct Kernel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel",
        abstract: "The guest kernel Swiftlet built.",
        subcommands: [Path.self])

    struct Path: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "path", abstract: "Print the cached guest kernel's path.")

        @Flag(help: "The bzImage instead of the ELF vmlinux.")
        var bzImage = false

        func run() throws {
            let link = GuestAssets.defaultKernel(bzImage: bzImage)
            guard let path = GuestAssets.resolve(link), access(path, R_OK) == 0 else {
                printError("no guest kernel at \(link): build it with `make kernel`")
                throw ExitCode(Status.setupFailed)
            }
            print(path)
        }
    }
}
