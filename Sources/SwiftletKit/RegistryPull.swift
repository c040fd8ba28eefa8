import Glibc
import Images
import SwiftletSystem
import VMM

/// A registry pull, done by `swiftlet-pull` (beside this executable) so that the HTTP and TLS
/// client never lives in the VMM's process. Its progress lines are relayed to stderr, its last
/// stderr line is the error when it fails, and a forwarded signal (Ctrl-C) stops it.
struct RegistryPull {
    var reference: ImageReference
    var insecure: Bool
    var progress: @Sendable (String) -> Void
    var interruptions: Int32?

    static var helperPath: String {
        let executable = (try? FileTree.currentExecutable()) ?? CommandLine.arguments[0]
        let directory = executable.lastIndex(of: "/").map { String(executable[..<$0]) } ?? "."
        return directory + "/swiftlet-pull"
    }

    func run(store: ImageStore) throws(SwiftletError) -> StoredImage {
        let digest = try Self.runHelper((insecure ? ["--insecure-registry"] : []) + [reference.description], what: "pull \(reference)",
                                        progress: progress, interruptions: interruptions)
        guard let image = try store.find(digest) else {
            throw SwiftletError(.notFound, "\(Self.helperPath) reported \(digest), which is not in the image store")
        }
        return image
    }

    /// Runs `swiftlet-pull` with `arguments` (`what` names the job in errors: "pull REF"),
    /// relaying its progress lines; returns what it printed on standard output (a digest),
    /// without whitespace. Its last stderr line is the error when it fails; a forwarded signal on
    /// `interruptions` stops it.
    static func runHelper(_ arguments: [String], what: String, progress: @Sendable (String) -> Void,
                          interruptions: Int32?) throws(SwiftletError) -> String {
        let helper = Self.helperPath
        guard access(helper, X_OK) == 0 else {
            throw SwiftletError(.notFound, "cannot \(what): no \(helper) (build it with `make build`)")
        }
        let outPipe = try OwnedFileDescriptor.pipe(), errPipe = try OwnedFileDescriptor.pipe()
        let arguments = [helper] + arguments
        let pid: pid_t
        do {
            // The write ends go to the helper, and are closed here after the spawn, so the reads
            // below end when the helper does.
            let outWrite = outPipe.writeEnd, errWrite = errPipe.writeEnd
            pid = try spawnChild(helper, arguments: arguments, output: .descriptor(outWrite.rawValue), error: .descriptor(errWrite.rawValue), what: helper)
            withExtendedLifetime(outWrite) {}
            withExtendedLifetime(errWrite) {}
        }
        let outRead = outPipe.readEnd, errRead = errPipe.readEnd

        var out: [UInt8] = [], err: [UInt8] = [], lastLine = ""
        var reading = [outRead.rawValue, errRead.rawValue]
        var buffer = [UInt8](repeating: 0, count: 16384)
        while reading.contains(where: { $0 >= 0 }) {
            let ready = try Poll.wait(reading + [interruptions ?? -1])
            if ready[2], let interruptions {
                try throwIfInterrupted(interruptions) {
                    // The helper ends its transfer (half-written files are removed or stay in tmp/) and is reaped.
                    ChildProcess.signal(pid, SIGTERM)
                    ChildProcess.wait(pid)
                }
            }
            for i in 0..<2 where reading[i] >= 0 && ready[i] {
                let n = (try? buffer.withMutableBytes { raw throws(SwiftletError) in
                    try OwnedFileDescriptor.readSome(fd: reading[i], into: raw, what: "\(helper)'s output")
                }) ?? 0
                if n <= 0 { reading[i] = -1; continue }
                if i == 0 { out += buffer[0..<n]; continue }
                err += buffer[0..<n]
                // Relay progress lines one behind: the last line is the error if the helper fails.
                while let newline = err.firstIndex(of: 10) {
                    if !lastLine.isEmpty { progress(Self.withoutPrefix(lastLine)) }
                    lastLine = String(decoding: err[..<newline], as: UTF8.self)
                    err.removeSubrange(...newline)
                }
            }
        }
        let status = ChildProcess.wait(pid)
        guard status == 0 else {
            let message = withoutPrefix(lastLine)
            throw SwiftletError(.systemCall, message.isEmpty ? "\(helper) failed (status \(status))" : message)
        }
        if !lastLine.isEmpty { progress(withoutPrefix(lastLine)) }
        return String(decoding: out, as: UTF8.self).filter { !$0.isWhitespace }
    }

    /// A line of the helper's without the `swiftlet: ` it starts with (the caller's own
    /// reporting adds one).
    static func withoutPrefix(_ line: String) -> String {
        line.hasPrefix("swiftlet: ") ? String(line.dropFirst(10)) : line
    }
}
