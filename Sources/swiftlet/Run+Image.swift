import ArgumentParser
import SwiftletKit

/// When `run --image` asks the registry: missing, always, never.
extension PullPolicy: ExpressibleByArgument {}

/// The flags `run`, `snapshot` and `machine create` share: what the guest's root is.
struct RootOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The image: a registry reference, an OCI layout directory, an image archive, or - (stdin).", valueName: "ref"))
    var image: String?

    @Option(help: ArgumentHelp("When to pull --image from its registry: missing (not in the store), always, never.", valueName: "policy"))
    var pull: PullPolicy = .missing

    @Flag(help: "Reach the image's registry over plain HTTP (loopback registries always are).")
    var insecureRegistry = false

    @Option(help: "A root filesystem image (EROFS or ext4) instead of the default busybox image.")
    var rootfs: String?

    func validate() throws {
        if image != nil && rootfs != nil { throw ValidationError("--image and --rootfs cannot be used together") }
    }
}
