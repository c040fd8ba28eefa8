import ArgumentParser
import Glibc
import Images
import SwiftletSystem
import VMM

/// When `run --image` asks the registry.
enum PullPolicy: String, ExpressibleByArgument, CaseIterable {
    case missing, always, never
}

/// The guest's root: read-only layer disks (bottom first) and how the command runs on them.
struct RootFilesystem {
    var disks: [String]
    var arguments: [String]
    var environment: [String]
    var workingDirectory: String
    var user: String

    /// `swiftlet.root=` for the agent: the disks' guest devices, bottom first.
    var deviceList: String {
        disks.indices.map { "/dev/vd" + String(UnicodeScalar(UInt8(ascii: "a") + UInt8($0))) }.joined(separator: ",")
    }
}

extension Run {
    /// The default image, --rootfs, or --image (pulled or imported into the store when needed),
    /// with the image config applied under the command line's -e, -w, -u and command.
    func resolveRoot(signals: Int32) throws(SwiftletError) -> RootFilesystem {
        // A detached run's image was resolved by the process that started it.
        let image = getenv(Self.resolvedImageVariable).map { String(cString: $0) } ?? self.image
        guard let image else {
            let path = rootfs ?? GuestAssets.defaultImage
            guard access(path, R_OK) == 0 else {
                throw SwiftletError(.notFound, rootfs != nil ? "no root filesystem image at \(path): check the --rootfs path"
                                                             : "no default image at \(path): build it with `make build`")
            }
            return RootFilesystem(disks: [path], arguments: command.isEmpty ? ["sh"] : command, environment: environment,
                                  workingDirectory: workdir ?? "/", user: user ?? "")
        }
        let store = try ImageStore()
        precondition(ImageStore.maximumLayerDisks <= MachineConfig.maximumDisks, "an image's disks must fit the machine")
        let resolver = ImageResolver(store: store, insecure: insecureRegistry, policy: pull, interruptions: signals >= 0 ? signals : nil)
        let resolved = try resolver.resolve(image)
        let execution = resolved.configuration.config
        let arguments = (execution?.Entrypoint ?? []) + (command.isEmpty ? (execution?.Cmd ?? []) : command)
        guard !arguments.isEmpty else {
            throw SwiftletError(.invalidArgument, "\(image) has no entrypoint or command: give one after --")
        }
        return RootFilesystem(
            disks: resolved.disks, arguments: arguments,
            environment: Self.merge(execution?.Env ?? [], environment),
            workingDirectory: workdir ?? (execution?.WorkingDir).flatMap { $0.isEmpty ? nil : $0 } ?? "/",
            user: user ?? execution?.User ?? "")
    }

    /// The image's environment with the command line's variables replacing the same names.
    static func merge(_ base: [String], _ overrides: [String]) -> [String] {
        func name(_ variable: String) -> Substring { variable.split(separator: "=", maxSplits: 1).first ?? Substring(variable) }
        let replaced = Set(overrides.map(name))
        return base.filter { !replaced.contains(name($0)) } + overrides
    }
}
