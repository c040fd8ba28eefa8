import Glibc
import SwiftletNet
import SwiftletSystem

/// A machine's passt: the user-mode network behind its virtio-net device. passt speaks to the
/// device over one end of a socket pair (4-byte big-endian length + Ethernet frame) and to the
/// world through ordinary sockets of the host; docs/networking.md has the options and why.
///
/// passt runs in the foreground, on a thread of this process that waits for it
/// (`HelperProcess`): it gets SIGKILL when that thread (so this process) ends, and it also ends
/// by itself when its socket's other end closes, which is what ends it after a root-started
/// passt drops to `nobody` (a change of user clears its death signal). So it never outlives the
/// VMM, `kill -9` included.
///
/// Start it before the process confines itself (`Confinement.confine` refuses fork and
/// execve); `stop` works after.
public final class PasstProcess: Sendable {
    /// Debian's passt (`apt-get install passt`; `scripts/setup` installs it).
    public static let defaultExecutable = "/usr/bin/passt"
    /// The most bytes passt's log file holds (passt drops its oldest lines past that).
    public static let logSizeLimit = 1 << 20
    /// How long `start` waits for passt to be ready before giving up.
    static let startTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// The child's descriptor for the socket (passt's `--fd`).
    static let socketDescriptor: Int32 = 3

    private let helper: HelperProcess

    private init(helper: HelperProcess) {
        self.helper = helper
    }

    deinit {
        helper.stop()
    }

    /// Starts passt on one end of a new socket pair; the returned `socket` is the other end (for VirtioNet).
    /// (A tuple cannot hold the noncopyable descriptor: `StartedPasst` is that pair.)
    ///
    /// passt tells the guest the addresses of `network`, answers ARP and NDP as the gateway
    /// (`gatewayMAC`), forwards DNS sent to `network.dns` to the host's resolver, maps
    /// `network.gateway` to the host's loopback and binds every publication of `configuration`
    /// on the host. Returns once passt is ready (its ports bound, its sandbox in place). Logs go
    /// to `logFile` (at most `logSizeLimit` bytes; created 0600 by passt), else to memory, kept
    /// only to explain a failed start. `executable` replaces `/usr/bin/passt` (tests).
    ///
    /// Throws `.notFound` when passt is not installed, `.invalidArgument` naming the address
    /// and port when a publication cannot be bound (in use, or below 1024 without privileges),
    /// and an error with the last lines of passt's log when it ends at start for another reason.
    public static func start(network: GuestNetwork = .default, configuration: NetworkConfiguration,
                             logFile: String?, executable: String? = nil) throws(SwiftletError) -> StartedPasst {
        let path = executable ?? defaultExecutable
        guard access(path, X_OK) == 0 else {
            if executable == nil {
                throw SwiftletError(.notFound, "passt is not installed (\(path) is missing): a machine with a network needs it; install it with `apt-get install passt` (scripts/setup does)")
            }
            throw SwiftletError(.notFound, "cannot start passt: \(path) does not exist or is not executable")
        }
        let pair = try UnixSocket.pair()
        let input = try OwnedFileDescriptor.open("/dev/null", flags: O_RDONLY)
        // passt's standard output and error (a line or two before its log file is open), and its
        // log when there is no log file.
        let output = try OwnedFileDescriptor.memoryFile(name: "passt-output")
        let arguments = Self.arguments(network: network, configuration: configuration,
                                       logFile: logFile ?? "/proc/self/fd/2")
        let helper = try HelperProcess.start(path, arguments: arguments, environment: [],
                                             descriptors: [input.rawValue, output.rawValue, output.rawValue, pair.second.rawValue],
                                             newSession: true, name: "passt")
        do throws(SwiftletError) {
            try waitUntilReady(helper, configuration: configuration, logFile: logFile, output: output)
        } catch {
            helper.stop()
            throw error
        }
        return StartedPasst(process: PasstProcess(helper: helper), socket: pair.first)
    }

    /// passt's process id.
    public var pid: Int32 { helper.pid }

    /// How passt ended, nil while it runs.
    public var exit: HelperExit? { helper.exit }

    /// Kills passt (SIGKILL) and reaps it. Idempotent; also done when the object goes away.
    public func stop() {
        helper.stop()
    }

    /// passt's arguments (after the program name) for `network`, `configuration` and its log.
    static func arguments(network: GuestNetwork, configuration: NetworkConfiguration, logFile: String) -> [String] {
        var arguments = [
            "--foreground", "--quiet",
            "--fd", "\(socketDescriptor)",
            "--log-file", logFile, "--log-size", "\(logSizeLimit)",
            "--mtu", "\(network.mtu)",
            "--address", "\(network.guestAddress)", "--netmask", "\(network.prefixLength)",
            "--gateway", "\(network.gateway)",
            "--mac-addr", "\(network.gatewayMAC)",
            "--dns-forward", "\(network.dns)",
            // The agent configures the guest's IPv4 address, route and resolver itself; NDP, router
            // advertisements and DHCPv6 stay for IPv6. The guest's only resolver is `dns`.
            "--no-dhcp", "--no-dhcp-dns", "--no-dhcp-search",
        ]
        for publication in configuration.published {
            arguments += [publication.transport == .tcp ? "--tcp-ports" : "--udp-ports", portSpec(publication)]
        }
        return arguments
    }

    /// passt's spec for one publication: `ADDRESS/HOST_PORT:GUEST_PORT`.
    static func portSpec(_ publication: PortPublication) -> String {
        "\(publication.hostAddress)/\(publication.hostPort):\(publication.guestPort)"
    }

    /// Waits until passt has installed its own seccomp filter (the last step of its setup, after
    /// binding ports and opening its log, just before its event loop), or has ended.
    private static func waitUntilReady(_ helper: HelperProcess, configuration: NetworkConfiguration,
                                       logFile: String?, output: borrowing OwnedFileDescriptor) throws(SwiftletError) {
        let ownFilters = seccompFilters(of: "self") ?? 0
        let deadline = MonotonicClock.now + startTimeoutNanoseconds
        var pause: UInt64 = 500_000
        while true {
            if let exit = helper.waitForExit(timeoutNanoseconds: pause) {
                throw startFailure(exit, configuration: configuration, logFile: logFile, output: output)
            }
            if let filters = seccompFilters(of: "\(helper.pid)"), filters > ownFilters { return }
            if MonotonicClock.now > deadline {
                throw SwiftletError(.systemCall, "passt did not get ready within \(startTimeoutNanoseconds / 1_000_000_000) s"
                                    + lastLines(logFile: logFile, output: output))
            }
            pause = min(pause * 2, 20_000_000)
        }
    }

    /// How many seccomp filters the process `pid` ("self" for this one) has, from
    /// /proc/PID/status (`Seccomp_filters`, Linux 5.9 and later; before, 1 for mode 2); nil when
    /// it cannot be read (the process has gone).
    static func seccompFilters(of pid: String) -> Int? {
        guard let status = try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/status", limit: 16384) else { return nil }
        var mode: Int?
        for line in status.split(separator: "\n") {
            if line.hasPrefix("Seccomp_filters:") { return Int(line.dropFirst("Seccomp_filters:".count).trimmingWhitespace) }
            if line.hasPrefix("Seccomp:") { mode = Int(line.dropFirst("Seccomp:".count).trimmingWhitespace) }
        }
        return mode.map { $0 == 2 ? 1 : 0 }
    }

    /// The error for a passt that ended at start: a publication it could not bind, by name, or
    /// its last words.
    static func startFailure(_ exit: HelperExit, configuration: NetworkConfiguration,
                             logFile: String?, output: borrowing OwnedFileDescriptor) -> SwiftletError {
        let lines = logLines(logFile: logFile, output: output)
        // "Failed to bind any port for '-t 127.0.0.1/8080:80', exiting"
        for line in lines.reversed() where line.contains("Failed to bind") {
            for publication in configuration.published {
                let option = publication.transport == .tcp ? "-t" : "-u"
                if line.contains("'\(option) \(portSpec(publication))'") {
                    let host = publication.hostAddress.isV4 ? "\(publication.hostAddress)" : "[\(publication.hostAddress)]"
                    return SwiftletError(.invalidArgument, "cannot publish \(host):\(publication.hostPort) (\(publication.transport.rawValue)): the port is in use, or below 1024 without the privilege to bind it; choose another host port with -p")
                }
            }
        }
        return SwiftletError(.systemCall, "passt \(exit) at start" + lastLines(lines))
    }

    /// passt's log lines (the log file's, else those in memory) after its standard error's,
    /// without its complaints that the system logger is missing.
    static func logLines(logFile: String?, output: borrowing OwnedFileDescriptor) -> [String] {
        var text = ""
        if let size = try? output.size(), size > 0, let bytes = try? output.read(count: Int(min(size, UInt64(logSizeLimit))), at: 0, what: "passt's output") {
            text = String(decoding: bytes, as: UTF8.self)
        }
        if let logFile, let bytes = try? OwnedFileDescriptor.readSmallFile(logFile, limit: 2 * logSizeLimit) {
            text += "\n" + String(decoding: bytes, as: UTF8.self)
        }
        return text.split(whereSeparator: { $0 == "\n" || $0 == "\0" })
            .map { String($0.trimmingWhitespace) }
            .filter { !$0.isEmpty && !$0.hasPrefix("Failed to send") }
    }

    private static func lastLines(logFile: String?, output: borrowing OwnedFileDescriptor) -> String {
        lastLines(logLines(logFile: logFile, output: output))
    }

    private static func lastLines(_ lines: [String]) -> String {
        let last = lines.suffix(5)
        return last.isEmpty ? " (passt said nothing)" : ": " + last.joined(separator: "; ")
    }
}

/// A started passt and the VMM's end of its socket (`let started = try PasstProcess.start(...)`,
/// then `started.process` and `started.socket`, each taken once).
@frozen public struct StartedPasst: ~Copyable, Sendable {
    public let process: PasstProcess
    /// The stream socket for `VirtioNet(backend:)`, close-on-exec.
    public let socket: OwnedFileDescriptor
}

extension Substring {
    fileprivate var trimmingWhitespace: Substring {
        var text = self
        while let first = text.first, first.isWhitespace { text = text.dropFirst() }
        while let last = text.last, last.isWhitespace { text = text.dropLast() }
        return text
    }
}
