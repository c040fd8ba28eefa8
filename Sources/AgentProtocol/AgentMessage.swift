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
    /// The guest's network is set up as `configureNetwork` asked.
    case networkConfigured

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
    /// Set up the guest's network interface (the one with `setup.mac`) as `setup` says, with a
    /// default route, `/etc/resolv.conf` and an `/etc/hosts` line. Idempotent: a restored
    /// machine may be sent it again. Answered with `networkConfigured`, or `failed`.
    case configureNetwork(NetworkSetup)

    public static let version: UInt32 = 6
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

/// How the guest's network interface is set up (`configureNetwork`). IPv4 only: IPv6, when the
/// network offers it (passt's router advertisements), the guest kernel configures by itself
/// (SLAAC on the same interface). Every field is checked when the message is decoded (`validate`).
public struct NetworkSetup: Equatable, Sendable {
    /// The guest's IPv4 address, dotted decimal ("10.0.2.15").
    public var address: String
    /// The length of the network's prefix (24 for a /24): 1 to 31, and `gateway` is inside it.
    public var prefixLength: UInt8
    /// The default route's next hop, inside the guest's network ("10.0.2.2").
    public var gateway: String
    /// The name servers for /etc/resolv.conf, IPv4 or IPv6 addresses, at most `maximumNameServers`.
    public var dns: [String]
    /// The interface's MTU, 68 to 65535.
    public var mtu: UInt32
    /// A name for `gateway` in /etc/hosts ("host.swiftlet.internal"); empty for none.
    public var hostName: String
    /// The interface's MAC address (6 bytes, unicast): how the agent finds it.
    public var mac: [UInt8]

    /// The most name servers the C library's resolver reads (`MAXNS`).
    public static let maximumNameServers = 3

    public init(address: String, prefixLength: UInt8, gateway: String, dns: [String], mtu: UInt32, hostName: String, mac: [UInt8]) {
        self.address = address; self.prefixLength = prefixLength; self.gateway = gateway; self.dns = dns
        self.mtu = mtu; self.hostName = hostName; self.mac = mac
    }

    /// Throws unless every field is well formed (see each field).
    public func validate() throws(AgentProtocolError) {
        guard let own = Self.ipv4(address) else { throw AgentProtocolError("network address '\(address.prefix(64))' is not an IPv4 address") }
        guard let next = Self.ipv4(gateway) else { throw AgentProtocolError("gateway '\(gateway.prefix(64))' is not an IPv4 address") }
        guard (1...31).contains(prefixLength) else { throw AgentProtocolError("network prefix length \(prefixLength) is not between 1 and 31") }
        let mask = UInt32.max << (32 - UInt32(prefixLength))
        guard own & mask == next & mask, own != next else {
            throw AgentProtocolError("gateway \(gateway) is not another address in \(address)/\(prefixLength)")
        }
        guard dns.count <= Self.maximumNameServers else {
            throw AgentProtocolError("\(dns.count) name servers (at most \(Self.maximumNameServers))")
        }
        for server in dns where Self.ipv4(server) == nil && !Self.looksLikeIPv6(server) {
            throw AgentProtocolError("name server '\(server.prefix(64))' is not an IP address")
        }
        guard (68...65535).contains(mtu) else { throw AgentProtocolError("MTU \(mtu) is not between 68 and 65535") }
        guard hostName.isEmpty || Self.isHostName(hostName) else { throw AgentProtocolError("'\(hostName.prefix(64))' is not a host name") }
        guard mac.count == 6, mac[0] & 1 == 0, mac.contains(where: { $0 != 0 }) else {
            throw AgentProtocolError("network MAC address of \(mac.count) bytes is not a unicast Ethernet address")
        }
    }

    /// `mac` as Linux prints it in /sys/class/net/*/address ("02:53:57:00:00:01").
    public var macText: String {
        let digits: [Character] = Array("0123456789abcdef")
        return mac.map { String([digits[Int($0 >> 4)], digits[Int($0 & 15)]]) }.joined(separator: ":")
    }

    /// A dotted-decimal IPv4 address (four numbers 0-255, no leading zeros) as a number, or nil.
    public static func ipv4(_ text: String) -> UInt32? {
        let parts = text.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard (1...3).contains(part.count), part.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }),
                  part.count == 1 || part.first != UInt8(ascii: "0") else { return nil }
            let number = part.reduce(UInt32(0)) { $0 * 10 + UInt32($1 - UInt8(ascii: "0")) }
            guard number <= 255 else { return nil }
            value = value << 8 | number
        }
        return value
    }

    /// Text made only of what an IPv6 address is written with (hex digits, colons, dots for an
    /// embedded IPv4 address), with at least two colons; the agent's `inet_pton` checks the rest.
    static func looksLikeIPv6(_ text: String) -> Bool {
        (2...45).contains(text.utf8.count) && text.utf8.filter { $0 == UInt8(ascii: ":") }.count >= 2
            && text.utf8.allSatisfy { c in
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains(c)
                    || (UInt8(ascii: "A")...UInt8(ascii: "F")).contains(c) || c == UInt8(ascii: ":") || c == UInt8(ascii: ".")
            }
    }

    /// A DNS name: at most 253 characters, dot-separated labels of 1 to 63 letters, digits and
    /// hyphens that neither start nor end with a hyphen.
    static func isHostName(_ text: String) -> Bool {
        guard text.utf8.count <= 253 else { return false }
        return text.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.count) && label.first != UInt8(ascii: "-") && label.last != UInt8(ascii: "-")
                && label.allSatisfy { c in
                    (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(c)
                        || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) || c == UInt8(ascii: "-")
                }
        }
    }
}
