import CLinux
import Glibc
import Synchronization
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
    /// What runs for `defaultExecutable`: Debian's passt, on a CPU with AVX2, only executes the
    /// passt.avx2 next to it; executing that at once spares passt's start an exec and a dynamic
    /// link (~40 ms of its ~170 ms of CPU time in the nested test host, on the critical path of
    /// `run --net` where cores are few).
    static let defaultProgram: String = {
        let avx2 = defaultExecutable + ".avx2"
        return swiftlet_host_has_avx2() == 1 && access(avx2, X_OK) == 0 ? avx2 : defaultExecutable
    }()
    /// The most bytes passt's log file holds (passt drops its oldest lines past that).
    public static let logSizeLimit = 1 << 20
    /// How long `start` waits for passt to be ready before giving up.
    static let startTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// The child's descriptor for the socket (passt's `--fd`).
    static let socketDescriptor: Int32 = 3

    private let helper: HelperProcess
    private let configuration: NetworkConfiguration
    private let logFile: String?
    /// passt's standard output and error, and its log when there is no log file.
    private let output: OwnedFileDescriptor
    /// A duplicate of the caller's end of passt's socket, for `stop` to shut the socket down.
    private let socket: OwnedFileDescriptor
    /// The seccomp filters passt inherited (this process's when it started passt): passt is
    /// ready when it has more. (Taken at the start: this process may confine itself later.)
    private let inheritedFilters: Int
    /// Set once `waitUntilReady` has seen passt ready.
    private let ready = Atomic<Bool>(false)
    /// Set when `stop` must not shut the socket down (`stopLeavingSocket`).
    private let leavesSocket = Atomic<Bool>(false)

    private init(helper: HelperProcess, inheritedFilters: Int, configuration: NetworkConfiguration, logFile: String?,
                 output: consuming OwnedFileDescriptor, socket: consuming OwnedFileDescriptor) {
        self.helper = helper
        self.socket = socket
        self.inheritedFilters = inheritedFilters
        self.configuration = configuration
        self.logFile = logFile
        self.output = output
    }

    deinit {
        stop()
    }

    /// Starts passt on one end of a new socket pair and returns once it is ready (its ports
    /// bound, its sandbox in place): `launch`, then `waitUntilReady`. Throws as both do.
    public static func start(network: GuestNetwork = .default, configuration: NetworkConfiguration,
                             logFile: String?, executable: String? = nil) throws(SwiftletError) -> StartedPasst {
        let started = try launch(network: network, configuration: configuration, logFile: logFile, executable: executable)
        do throws(SwiftletError) {
            try started.process.waitUntilReady()
        } catch {
            started.process.stop()
            throw error
        }
        return started
    }

    /// Starts passt on one end of a new socket pair and returns at once; the returned `socket`
    /// is the other end (for VirtioNet). passt sets itself up (some tens of milliseconds) while
    /// the caller builds its machine: frames the guest sends meanwhile wait in the socket.
    /// `waitUntilReady` then says whether passt came up (and names a port it could not bind).
    /// (A tuple cannot hold the noncopyable descriptor: `StartedPasst` is that pair.)
    ///
    /// passt tells the guest the addresses of `network`, answers ARP and NDP as the gateway
    /// (`gatewayMAC`), forwards DNS sent to `network.dns` to the host's resolver, maps
    /// `network.gateway` to the host's loopback and binds every publication of `configuration`
    /// on the host. Logs go to `logFile` (at most `logSizeLimit` bytes; created 0600 by passt),
    /// else to memory, kept only to explain a failed start. `executable` replaces
    /// `/usr/bin/passt` (tests).
    ///
    /// Throws `.notFound` when passt is not installed.
    public static func launch(network: GuestNetwork = .default, configuration: NetworkConfiguration,
                              logFile: String?, executable: String? = nil) throws(SwiftletError) -> StartedPasst {
        let pair = try UnixSocket.pair()
        let process = try launch(network: network, configuration: configuration, logFile: logFile, executable: executable,
                                 on: pair.second.rawValue, near: pair.first.rawValue)
        return StartedPasst(process: process, socket: pair.first)
    }

    /// `launch` on a socket pair the caller made before (its device joined to `near` already,
    /// passt given `far`; the caller keeps both).
    public static func launch(network: GuestNetwork = .default, configuration: NetworkConfiguration, logFile: String?,
                              executable: String? = nil, on far: Int32, near: Int32) throws(SwiftletError) -> PasstProcess {
        let path = executable ?? defaultExecutable
        guard access(path, X_OK) == 0 else {
            if executable == nil {
                throw SwiftletError(.notFound, "passt is not installed (\(path) is missing): a machine with a network needs it; install it with `apt-get install passt` (scripts/setup does)")
            }
            throw SwiftletError(.notFound, "cannot start passt: \(path) does not exist or is not executable")
        }
        let input = try OwnedFileDescriptor.open("/dev/null", flags: O_RDONLY)
        // passt's standard output and error (a line or two before its log file is open), and its
        // log when there is no log file.
        let output = try OwnedFileDescriptor.memoryFile(name: "passt-output")
        let arguments = Self.arguments(network: network, configuration: configuration,
                                       logFile: logFile ?? "/proc/self/fd/2")
        let socket = try OwnedFileDescriptor.duplicate(near, what: "passt's socket")
        let inheritedFilters = seccompFilters(of: "self") ?? 0
        let helper = try HelperProcess.start(executable ?? defaultProgram, arguments: arguments, environment: [],
                                             descriptors: [input.rawValue, output.rawValue, output.rawValue, far],
                                             newSession: true, name: "passt")
        return PasstProcess(helper: helper, inheritedFilters: inheritedFilters, configuration: configuration, logFile: logFile,
                            output: output, socket: socket)
    }

    /// Waits until passt is ready: it has installed its own seccomp filter (the last step of its
    /// setup, after binding ports and opening its log, just before its event loop). Returns at
    /// once when it was ready before. Throws `.invalidArgument` naming the address and port when
    /// a publication could not be bound (in use, or below 1024 without privileges), and an
    /// error with the last lines of passt's log when it ended for another reason or did not get
    /// ready within `startTimeoutNanoseconds`. passt keeps running on a timeout: `stop` ends it.
    public func waitUntilReady() throws(SwiftletError) {
        if ready.load(ordering: .acquiring) { return }
        let deadline = MonotonicClock.now + Self.startTimeoutNanoseconds
        var pause: UInt64 = 500_000
        while true {
            if let exit = helper.waitForExit(timeoutNanoseconds: pause) {
                throw Self.startFailure(exit, configuration: configuration, logFile: logFile, output: output)
            }
            if let filters = Self.seccompFilters(of: "\(helper.pid)"), filters > inheritedFilters {
                ready.store(true, ordering: .releasing)
                return
            }
            if MonotonicClock.now > deadline {
                throw SwiftletError(.systemCall, "passt did not get ready within \(Self.startTimeoutNanoseconds / 1_000_000_000) s"
                                    + Self.lastLines(logFile: logFile, output: output))
            }
            pause = min(pause * 2, 20_000_000)
        }
    }

    /// passt's process id.
    public var pid: Int32 { helper.pid }

    /// How passt ended, nil while it runs.
    public var exit: HelperExit? { helper.exit }

    /// Ends passt and reaps it: shuts its socket down (passt ends by itself when the socket
    /// closes), then kills it (SIGKILL). Both, because each may be all that works: a passt that
    /// is busy or stuck does not look at its socket, and a passt started as root runs as
    /// `nobody`, which this process can no longer signal once it has dropped its capabilities
    /// (`Confinement`). The socket (and the device on it) sees end of file. Idempotent; also
    /// done when the object goes away.
    public func stop() {
        if !leavesSocket.load(ordering: .acquiring) { UnixSocket.shutdown(socket.rawValue, .both) }
        helper.stop()
    }

    /// Ends passt, leaving the socket as it is, for another passt to take it over (a passt that
    /// could not bind a port yet).
    func stopLeavingSocket() {
        leavesSocket.store(true, ordering: .releasing)
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
