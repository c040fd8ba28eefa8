import ArgumentParser
import Glibc
import Images
import SwiftletKit
import SwiftletSystem

struct Image: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Work with images: pull them into the store, list, inspect and remove them.",
        discussion: """
            The image store lives in $SWIFTLET_HOME (default ~/.local/share/swiftlet): blobs by \
            sha256, verified on the way in, each layer stored and converted to a guest disk once.
            """,
        subcommands: [Pull.self, List.self, Inspect.self, Remove.self, Prune.self, Convert.self])

    struct Pull: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pull",
            abstract: "Pull an image from a registry, or import an OCI layout directory or image archive, into the store.")

        @Argument(help: "A registry reference, an OCI layout directory, an archive (docker save or OCI), or - for stdin; PATH:TAG picks one image.")
        var source: String

        @Flag(help: "Reach the registry over plain HTTP (loopback registries always are).")
        var insecureRegistry = false

        @Flag(name: .shortAndLong, help: "Print only the image's digest.")
        var quiet = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let store = try ImageStore()
                let resolver = ImageResolver(store: store, insecure: insecureRegistry, policy: .always,
                                             progress: { [quiet] line in if !quiet { printError(line) } })
                let resolved = try resolver.resolve(source)
                print(quiet ? resolved.image.manifest.description : "\(resolved.image.name ?? source): \(resolved.image.manifest)")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the images in the store.")

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let images = try ImageStore().images()
                if json {
                    print(String(decoding: try ImageStore.json(images), as: UTF8.self))
                    return
                }
                var rows = [["NAME", "DIGEST", "PLATFORM", "LAYERS", "SIZE"]]
                for image in images {
                    rows.append([image.name ?? "<none>", image.manifest.short, image.platform, String(image.layers.count), ImagePuller.formatSize(image.size)])
                }
                let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
                for row in rows {
                    print(zip(row, widths).map { $0.0.padding(to: $0.1) }.joined(separator: "  ").trimmingTrailingSpaces)
                }
            }
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "inspect", abstract: "Print an image's record, manifest and config as JSON.")

        @Argument(help: "Image name or digest (or a prefix of it).")
        var image: String

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let store = try ImageStore()
                guard let stored = try store.find(image) else {
                    throw SwiftletError(.notFound, "no image \(image.debugDescription) in the image store (see `swiftlet image ls`)")
                }
                print(String(decoding: try store.inspect(stored), as: UTF8.self))
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove images, and whatever no other image or machine uses.",
            discussion: "Layer disks that a machine (`swiftlet machine`) boots from stay until the last such machine is removed; `image prune` then deletes them.")

        @Argument(help: "Image names or digests.")
        var images: [String]

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let store = try ImageStore()
                for image in images {
                    // Under the machines lock: no machine is made from the store while its disks are weighed.
                    let freed = try MachineDirectory.withLock { () throws(SwiftletError) in
                        try store.remove(image, keepingDisks: MachineDirectory.layerDisksInUse())
                    }
                    print("removed \(image) (\(ImagePuller.formatSize(freed)) freed)")
                }
            }
        }
    }

    struct Prune: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "prune",
            abstract: "Delete unnamed images, and blobs, disks and unfinished downloads no image or machine uses, and the boot templates (`run` saves them again when needed).")

        func run() throws {
            try exitingOnSetupFailure { () throws(SwiftletError) in
                let store = try ImageStore()
                let freed = try MachineDirectory.withLock { () throws(SwiftletError) in
                    try store.prune(unnamedImages: true, keepingDisks: MachineDirectory.layerDisksInUse())
                } + BootTemplate.removeAll()
                print("\(ImagePuller.formatSize(freed)) freed")
            }
        }
    }

    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "convert",
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
            try exitingOnSetupFailure { () throws(SwiftletError) in
                for warning in try LayerConverter.convert(tarPath: archive, to: output) { printError("warning: \(warning)") }
            }
        }
    }
}

extension String {
    func padding(to width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    var trimmingTrailingSpaces: String { String(reversed().drop(while: { $0 == " " }).reversed()) }
}
