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
    var quiet: Bool
    var interruptions: Int32?

    static var helperPath: String {
        let executable = GuestAssets.resolve("/proc/self/exe") ?? CommandLine.arguments[0]
        let directory = executable.lastIndex(of: "/").map { String(executable[..<$0]) } ?? "."
        return directory + "/swiftlet-pull"
    }

    private func relay(_ line: String) {
        guard !quiet else { return }
        var text = line + "\n"
        text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }

    func run(store: ImageStore) throws(SwiftletError) -> StoredImage {
        let helper = Self.helperPath
        guard access(helper, X_OK) == 0 else {
            throw SwiftletError(.notFound, "cannot pull \(reference): no \(helper) (build it with `make build`)")
        }
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else {
            throw SwiftletError.system("cannot create a pipe", errno: currentErrno)
        }
        for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let arguments = [helper] + (insecure ? ["--insecure-registry"] : []) + [reference.description]
        let spawned = Result { () throws(SwiftletError) in
            try spawnChild(helper, arguments: arguments, output: .descriptor(outPipe[1]), error: .descriptor(errPipe[1]), what: helper)
        }
        close(outPipe[1]); close(errPipe[1])
        defer { close(outPipe[0]); close(errPipe[0]) }
        let pid = try spawned.get()

        var out: [UInt8] = [], err: [UInt8] = [], lastLine = ""
        var waits = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0), pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        if let interruptions { waits.append(pollfd(fd: interruptions, events: Int16(POLLIN), revents: 0)) }
        var open = 2
        var buffer = [UInt8](repeating: 0, count: 16384)
        while open > 0 {
            if poll(&waits, nfds_t(waits.count), -1) < 0 { continue }
            if waits.count > 2, waits[2].revents != 0 { exitIfInterrupted(waits[2].fd) { kill(pid, SIGTERM) } }
            for i in 0..<2 where waits[i].fd >= 0 && waits[i].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(waits[i].fd, $0.baseAddress, $0.count) }
                if n <= 0 { waits[i].fd = -1; open -= 1; continue }
                if i == 0 { out += buffer[0..<n]; continue }
                err += buffer[0..<n]
                // Relay progress lines one behind: the last line is the error if the pull fails.
                while let newline = err.firstIndex(of: 10) {
                    if !lastLine.isEmpty { relay(lastLine) }
                    lastLine = String(decoding: err[..<newline], as: UTF8.self)
                    err.removeSubrange(...newline)
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        guard status == 0 else {
            let message = lastLine.hasPrefix("swiftlet: ") ? String(lastLine.dropFirst(10)) : lastLine
            throw SwiftletError(.systemCall, message.isEmpty ? "\(helper) failed (status \(status))" : message)
        }
        if !lastLine.isEmpty { relay(lastLine) }
        let digest = String(decoding: out, as: UTF8.self).filter { !$0.isWhitespace }
        guard let image = try store.find(digest) else {
            throw SwiftletError(.notFound, "\(helper) reported \(digest), which is not in the image store")
        }
        return image
    }
}
