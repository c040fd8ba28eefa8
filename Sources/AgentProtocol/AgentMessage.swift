/// The messages between Swiftlet (host) and `swiftlet-init` (guest), over one vsock stream the
/// agent opens to the host at start-up. Framing and encoding are in `AgentFrame`; the format is
/// documented in docs/agent-protocol.md.
public enum AgentMessage: Equatable, Sendable {
    // guest → host
    /// The agent is up (and the root filesystem is ready, if it was given one at boot).
    case ready(version: UInt32)
    /// The command started with this process id.
    case started(pid: Int32)
    case stdout([UInt8])
    case stderr([UInt8])
    /// The command ended: its exit status, or 128 + N for signal N (as a shell reports it).
    case exited(status: Int32)
    /// The agent could not do what was asked: `status` is what the command would have exited with
    /// (127 for a command that does not exist, 126 for one that cannot run).
    case failed(status: Int32, message: String)
    /// The root the host asked for (`mountRoot`) is mounted and is the agent's root now.
    case rootMounted
    /// The answer to `challenge`: `AgentAuthentication.proof(key:nonce:)`.
    case proof([UInt8])

    // host → guest
    case exec(ExecRequest)
    case stdin([UInt8])
    /// The host's standard input ended.
    case closeStdin
    /// Deliver this signal to the command's process group.
    case signal(Int32)
    /// The host terminal changed size (rows, columns).
    case resize(rows: UInt16, columns: UInt16)
    /// Open another connection to the host for a command of its own (the agent answers on the new
    /// connection with `ready`); lets one machine run several commands at once.
    case openSession
    /// The machine is a new copy of another (a restore or a fork): take this hostname (unless
    /// empty), and mix
    /// this host randomness into the kernel's random pool and reseed its generator, which every
    /// copy would otherwise continue identically.
    case identity(hostname: String, seed: [UInt8])
    /// Make these disks (guest devices, bottom layer first; read-only, under a writable tmpfs) the
    /// root, as `swiftlet.root=` does at boot, for an agent that booted without one. The disks may
    /// have just gone into empty drives: the agent waits until the kernel sees them. Answered with
    /// `rootMounted`, or `failed` (the agent stays in its initramfs).
    case mountRoot(devices: [String])
    /// The machine's agent key (`AgentAuthentication.keyLength` bytes), sent on the first session
    /// of a booted machine, before any other process runs in the guest: the agent keeps the first
    /// it is given, for its life and every copy of the machine.
    case agentKey([UInt8])
    /// Show that you hold the machine's agent key: answered with `proof`.
    case challenge(nonce: [UInt8])

    public static let version: UInt32 = 5
}

/// What to run and how.
public struct ExecRequest: Equatable, Sendable {
    public var arguments: [String]
    public var environment: [String]
    public var workingDirectory: String
    /// A user name, uid, or uid:gid; empty for root.
    public var user: String
    /// Give the command a pseudo-terminal (stdout and stderr both arrive as `stdout`).
    public var terminal: Bool
    public var rows: UInt16
    public var columns: UInt16

    public init(arguments: [String], environment: [String] = [], workingDirectory: String = "/", user: String = "",
                terminal: Bool = false, rows: UInt16 = 24, columns: UInt16 = 80) {
        self.arguments = arguments; self.environment = environment; self.workingDirectory = workingDirectory
        self.user = user; self.terminal = terminal; self.rows = rows; self.columns = columns
    }
}
