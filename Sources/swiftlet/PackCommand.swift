import ArgumentParser
import Glibc
import Hypervisor
import Images
import Pack
import SwiftletKit
import SwiftletSystem

struct PackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pack",
        abstract: "Pack a machine into one file that runs on any host with Swiftlet; inspect and verify packs.",
        discussion: """
            A pack holds an image with the kernel and agent it boots with (--image), a snapshot \
            whole (--from: its state, memory and writable disks, and the image layers it was taken \
            with) or a machine (--machine), each part in checked, compressed chunks \
            (docs/pack-format.md). `swiftlet run --image FILE` boots or restores it and runs a \
            command in a copy (the file is left as it is); `machine create --from FILE` makes a \
            machine of a machine's pack.

              swiftlet snapshot --image alpine:3.20 -o alpine.snap
              swiftlet pack create --from alpine.snap -o alpine.swiftlet
              swiftlet run --image alpine.swiftlet -- cat /etc/os-release
              swiftlet pack create --from alpine.snap -o alpine --executable
              ./alpine -- cat /etc/os-release
              swiftlet pack push alpine.swiftlet registry.example.com/me/alpine:snap
              swiftlet pack pull registry.example.com/me/alpine:snap -o alpine.swiftlet
            """,
        subcommands: [Create.self, RunPack.self, Inspect.self, Verify.self, Push.self, Pull.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Pack a snapshot (`swiftlet snapshot`, `machine snapshot`) or a machine, and the image layers it uses, into one file.")

        @Option(help: ArgumentHelp("The image to pack (a registry reference, OCI layout, archive or digest; pulled when needed) with the kernel and agent it boots with. Without --image, --from or --machine: the default image.", valueName: "ref"))
        var image: String?

        @Flag(help: "With --image: reach the registry over plain HTTP (loopback registries always are).")
        var insecureRegistry = false

        @Option(help: ArgumentHelp("The snapshot directory to pack (a full snapshot).", valueName: "dir"))
        var from: String?

        @Option(help: ArgumentHelp("The machine to pack: stopped, its disk (it boots where it is made a machine again); with --with-memory, running, a snapshot of it (it goes on where it was).", valueName: "name"))
        var machine: String?

        @Flag(help: "With --machine: pack the running machine's memory and processes too (the machine keeps running).")
        var withMemory = false

        @Option(name: .shortAndLong, help: ArgumentHelp("The pack file to write (replaced if it exists).", valueName: "file"))
        var output: String

        @Flag(help: "Write a program: Swiftlet's executable with the pack appended; `./FILE -- ARGS` runs the machine's command on any host with /dev/kvm.")
        var executable = false

        @Option(help: ArgumentHelp("With --image (or a stopped --machine): the machines it makes boot showing only this CPU baseline's features (\(CPUTemplate.allCases.map(\.rawValue).joined(separator: ", "))). With memory: the machine must have been made with it.", valueName: "name"))
        var cpuTemplate: CPUTemplate?

        func validate() throws {
            guard [image != nil, from != nil, machine != nil].filter({ $0 }).count <= 1 else {
                throw ValidationError("give one of --image REF, --from DIR and --machine NAME (none: the default image)")
            }
            if withMemory && machine == nil { throw ValidationError("--with-memory goes with --machine (a snapshot holds its memory already)") }
            if executable && machine != nil && !withMemory {
                throw ValidationError("a packed program runs a snapshot: pack the machine --with-memory")
            }
        }

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let program = executable ? try FileTree.currentExecutable() : nil
                let report = if let machine {
                    try MachinePack.create(machine: machine, withMemory: withMemory, to: output, executable: program, cpuTemplate: cpuTemplate)
                } else if let from {
                    try MachinePack.create(fromSnapshot: from, to: output, executable: program, cpuTemplate: cpuTemplate)
                } else {
                    try MachinePack.create(image: image, insecureRegistry: insecureRegistry, to: output, executable: program,
                                           cpuTemplate: cpuTemplate, progress: { printError($0) })
                }
                let contents = report.manifest.parts.reduce(0) { $0 + $1.size }
                print("\(report.path): \(report.manifest.parts.count) parts, \(size(contents)) packed into \(size(report.bytes))")
            }
        }
    }

    struct RunPack: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Run a command in a pack's machine: `swiftlet run --image FILE`, with run's options.",
            discussion: """
                A snapshot's pack restores and runs the command in a copy (the file is left as it is); \
                an image's pack boots its image with the kernel it holds. Everything after FILE is \
                `swiftlet run`'s: options, then -- and the command.

                  swiftlet pack run app.swiftlet -- python3 -c 'print(1)'
                  swiftlet pack run app.swiftlet --net -e DEBUG=1 -- ./serve
                """)

        @Argument(help: "The pack file.")
        var file: String

        @Argument(parsing: .captureForPassthrough, help: ArgumentHelp("`swiftlet run`'s options, then -- and the command.", valueName: "run-options"))
        var arguments: [String] = []

        func validate() throws {
            guard MachinePack.looksLikePack(file) else {
                throw ValidationError("\(file) is not a pack (`swiftlet pack create` makes one; `swiftlet run --image` runs images)")
            }
        }

        func run() throws {
            let run = try Run.parse(["--image", file] + arguments)
            try run.run()
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "inspect", abstract: "Show what a pack holds.")

        @Argument(help: "The pack file.")
        var file: String

        @Flag(help: "Print the pack's manifest as JSON.")
        var json = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let (manifest, start, fileSize) = try MachinePack.inspect(file)
                if json {
                    print(String(decoding: try manifest.encoded(), as: UTF8.self))
                    return
                }
                print("kind: \(manifest.kind.rawValue), format \(manifest.format), made by \(manifest.createdBy)")
                print(start == 0 ? "size: \(size(fileSize))" : "size: \(size(fileSize - start)) after an executable of \(size(start))")
                if let cpu = manifest.cpu {
                    let (names, unnamed) = cpu.featureNames
                    let tsc = cpu.tscKHz.map { ", TSC \($0) kHz" } ?? ""
                    print("cpu: \(cpu.vendor.isEmpty ? "any vendor" : cpu.vendor)\(tsc); its memory needs \(names.joined(separator: " "))\(unnamed > 0 ? " and \(unnamed) more feature bits" : "")")
                }
                var rows = [["PART", "SIZE", "STORED", "SHA256"]]
                for part in manifest.parts {
                    rows.append([part.name, size(part.size), size(part.storedBytes), Hex.encode(part.sha256)])
                }
                let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
                for row in rows {
                    print(zip(row, widths).map { $0.0.padding(to: $0.1) }.joined(separator: "  ").trimmingTrailingSpaces)
                }
            }
        }
    }

    struct Push: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "push",
            abstract: "Push a pack to an OCI registry (as an artifact of type application/vnd.swiftlet.pack.v1).",
            discussion: "Credentials: SWIFTLET_REGISTRY_USER and SWIFTLET_REGISTRY_PASSWORD, as for image pulls (sent only to the registry named, over HTTPS unless it is on loopback or --insecure-registry is given).")

        @Argument(help: "The pack file.")
        var file: String

        @Argument(help: ArgumentHelp("Where: REGISTRY/REPOSITORY:TAG.", valueName: "ref"))
        var reference: String

        @Flag(help: "Reach the registry over plain HTTP (loopback registries always are).")
        var insecureRegistry = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let digest = try MachinePack.push(file, to: reference, insecureRegistry: insecureRegistry, progress: { printError($0) })
                print("\(reference)@\(digest)")
            }
        }
    }

    struct Pull: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pull",
            abstract: "Pull a pack from an OCI registry into a file (`pack push` put it there).",
            discussion: "The file is written beside its place and renamed there once its digest matched the registry's manifest; anything but a Swiftlet pack is refused.")

        @Argument(help: ArgumentHelp("REGISTRY/REPOSITORY:TAG or @sha256:DIGEST.", valueName: "ref"))
        var reference: String

        @Option(name: .shortAndLong, help: ArgumentHelp("The pack file to write (replaced if it exists).", valueName: "file"))
        var output: String

        @Flag(help: "Reach the registry over plain HTTP (loopback registries always are).")
        var insecureRegistry = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let digest = try MachinePack.pull(reference, to: output, insecureRegistry: insecureRegistry, progress: { printError($0) })
                print("\(output): \(reference)@\(digest)")
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "verify", abstract: "Read every part of a pack and check it against its SHA-256.")

        @Argument(help: "The pack file.")
        var file: String

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let checked = try MachinePack.verify(file)
                print("\(file): intact (\(size(checked)) checked)")
            }
        }
    }
}

private func size(_ bytes: UInt64) -> String { ImagePuller.formatSize(Int64(clamping: bytes)) }
