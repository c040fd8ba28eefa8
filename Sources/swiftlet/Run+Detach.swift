import ArgumentParser
import Glibc
import Images
import SwiftletSystem
import VMM

/// `swiftlet run -d`: the same run in the background, in a session of its own, with its output in
/// files. The image is resolved first, so a bad image fails in the foreground; the background run
/// is this executable again, told the image's digest and that it is the detached one.
extension Run {
    static let detachedChildVariable = "SWIFTLET_DETACHED_RUN"
    static let resolvedImageVariable = "SWIFTLET_RESOLVED_IMAGE"
    /// glibc's POSIX_SPAWN_SETSID (2.26 and later), which <spawn.h> hides without _GNU_SOURCE.
    static let spawnSetSID: Int32 = 0x80

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
        for path in [ImageStore.defaultRoot(), ImageStore.defaultRoot() + "/runs", directory] {
            if mkdir(path, 0o755) != 0 && errno != EEXIST { throw SwiftletError.system("cannot create \(path)", errno: currentErrno) }
        }
        var environment = [Self.detachedChildVariable + "=" + id]
        if let image {
            let store = try ImageStore()
            let resolved = try ImageResolver(store: store, insecure: insecureRegistry, policy: pull, quiet: true).resolve(image)
            environment.append(Self.resolvedImageVariable + "=" + resolved.image.manifest.description)
        }
        let executable = GuestAssets.resolve("/proc/self/exe") ?? CommandLine.arguments[0]
        let pid = try spawnDetached(executable, arguments: CommandLine.arguments, environment: environment, directory: directory)
        print(id)
        printError("running in the background (pid \(pid)); output and status in \(directory)")
    }

    /// Starts `executable` in a new session with stdin from /dev/null and stdout/stderr to files.
    private func spawnDetached(_ executable: String, arguments: [String], environment extra: [String], directory: String) throws(SwiftletError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, directory + "/stdout", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, directory + "/stderr", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t(), all = sigset_t()
        sigemptyset(&empty)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | Self.spawnSetSID))
        var environment: [String] = []
        var entry = environ
        while let pointer = entry.pointee { environment.append(String(cString: pointer)); entry += 1 }
        environment += extra
        let cArguments = arguments.map { strdup($0) } + [nil]
        let cEnvironment = environment.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) }; cEnvironment.forEach { free($0) } }
        var pid = pid_t()
        let result = posix_spawn(&pid, executable, &actions, &attributes, cArguments, cEnvironment)
        guard result == 0 else { throw SwiftletError(.systemCall, "cannot start the background run: \(String(cString: strerror(result)))") }
        return pid
    }

    /// In the background run: records the exit status once the command has ended.
    static func recordStatus(_ status: Int32) {
        guard let id = getenv(detachedChildVariable).map({ String(cString: $0) }) else { return }
        let path = runDirectory(id) + "/status"
        let fd = open(path + ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        var text = "\(status)\n"
        text.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
        close(fd)
        rename(path + ".tmp", path)
    }
}
