import ArgumentParser
import Glibc
import Images
import SwiftletSystem
import SwiftletKit
import VMM

/// `swiftlet run -d`: the same run in the background, in a session of its own, with its output in
/// files. The image is resolved first, so a bad image fails in the foreground; the background run
/// is this executable again, told the image's digest and that it is the detached one.
extension Run {
    static let detachedChildVariable = "SWIFTLET_DETACHED_RUN"
    static let resolvedImageVariable = "SWIFTLET_RESOLVED_IMAGE"

    /// Whether this process is the background half of a `run -d`.
    static var isDetachedChild: Bool { getenv(detachedChildVariable) != nil }

    /// Where a detached run keeps `stdout`, `stderr` and, once it ends, `status`.
    static func runDirectory(_ id: String) -> String { ImageStore.defaultRoot() + "/runs/" + id }

    /// Resolves the image, starts the background run and prints its ID.
    func startInBackground() throws(SwiftletError) {
        var bytes = [UInt8](repeating: 0, count: 6)
        try bytes.withMutableBytes { raw throws(SwiftletError) in try SystemRandom.fill(raw) }
        let id = Digest(bytes: bytes).hex
        let directory = Self.runDirectory(id)
        try makeDirectories(directory, mode: 0o700) // private: the run's output is the user's
        var environment = [Self.detachedChildVariable + "=" + id]
        if let image = source.image {
            let store = try ImageStore()
            let resolved = try ImageResolver(store: store, insecure: source.insecureRegistry, policy: source.pull).resolve(image)
            environment.append(Self.resolvedImageVariable + "=" + resolved.image.manifest.description)
        }
        let executable = (try? FileTree.currentExecutable()) ?? CommandLine.arguments[0]
        let pid = try spawnChild(executable, arguments: CommandLine.arguments, environment: currentEnvironment() + environment,
                                 output: .file(directory + "/stdout"), error: .file(directory + "/stderr"), newSession: true,
                                 what: "the background run")
        print(id)
        printError("running in the background (pid \(pid)); output and status in \(directory)")
    }

    /// In the background run: records the exit status once the command has ended.
    static func recordStatus(_ status: Int32) {
        guard let id = getenv(detachedChildVariable).map({ String(cString: $0) }) else { return }
        try? OwnedFileDescriptor.writeSmallFileAtomically(runDirectory(id) + "/status", Array("\(status)\n".utf8))
    }
}
