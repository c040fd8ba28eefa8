import SwiftletSystem

/// A host name the guest may resolve and reach (`--allow-host`): an exact name (`pypi.org`) or
/// `*.` and a suffix (`*.example.com`: any name under example.com, at any depth, but not
/// example.com itself nor badexample.com). Case-insensitive; a trailing dot is ignored. Names
/// are DNS host names: labels of 1–63 letters, digits and hyphens (not first or last), 253
/// characters at most; `*` only as the whole first label. Codable as its text.
public struct HostPattern: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The name (or the suffix, for a wildcard) in lowercase, without a trailing dot.
    public let name: String
    /// Whether the pattern is `*.name`.
    public let isWildcard: Bool

    public init(parsing text: String) throws(SwiftletError) {
        var rest = Substring(text)
        if rest.hasSuffix(".") { rest = rest.dropLast() }
        let wildcard = rest.hasPrefix("*.")
        if wildcard { rest = rest.dropFirst(2) }
        let example = "a host name like api.example.com, or *.example.com for every name under example.com"
        if (try? IPAddress(parsing: String(rest))) != nil {
            throw SwiftletError(.invalidArgument, "'\(text)' is an address, not a host name: allow it with --allow-cidr")
        }
        if let problem = Self.problem(in: rest) {
            throw SwiftletError(.invalidArgument, "'\(text)' is not a valid host pattern (\(problem)): use \(example)")
        }
        name = rest.lowercased()
        isWildcard = wildcard
    }

    /// What is wrong with `name` as a DNS host name, or nil.
    static func problem(in name: Substring) -> String? {
        if name.isEmpty { return "empty name" }
        if name.utf8.count > 253 { return "longer than 253 characters" }
        for label in name.split(separator: ".", omittingEmptySubsequences: false) {
            if label.isEmpty { return "empty label" }
            if label == "*" { return "'*' may only be the whole first label" }
            if label.utf8.count > 63 { return "a label is longer than 63 characters" }
            if !label.utf8.allSatisfy(Self.isHostByte) { return "'\(label)' has characters other than letters, digits and '-'" }
            if label.hasPrefix("-") || label.hasSuffix("-") { return "'\(label)' starts or ends with '-'" }
        }
        return nil
    }

    static func isHostByte(_ byte: UInt8) -> Bool {
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || byte == 0x2D
    }

    /// Whether `candidate` (lowercase, no trailing dot: as `DNSName.text` gives it) matches.
    public func matches(_ candidate: String) -> Bool {
        guard isWildcard else { return candidate == name }
        return candidate.utf8.count > name.utf8.count + 1 && candidate.hasSuffix(name)
            && candidate.utf8.dropLast(name.utf8.count).last == UInt8(ascii: ".")
    }

    public var description: String { (isWildcard ? "*." : "") + name }

    public init(from decoder: any Decoder) throws {
        self = try Self(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// A port the host forwards into the guest (`-p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`).
/// The host address defaults to 127.0.0.1 (the host only); `0.0.0.0` must be asked for.
public struct PortPublication: Hashable, Sendable, Codable, CustomStringConvertible {
    public enum Transport: String, Hashable, Sendable, Codable { case tcp, udp }

    public var hostAddress: IPAddress
    public var hostPort: UInt16
    public var guestPort: UInt16
    public var transport: Transport

    public init(hostAddress: IPAddress = .v4(0x7F00_0001), hostPort: UInt16, guestPort: UInt16, transport: Transport = .tcp) {
        self.hostAddress = hostAddress
        self.hostPort = hostPort
        self.guestPort = guestPort
        self.transport = transport
    }

    public init(parsing text: String) throws(SwiftletError) {
        let usage = "use [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80 or 0.0.0.0:8080:80/tcp or [::1]:8080:80"
        var rest = Substring(text)
        transport = .tcp
        if let slash = rest.lastIndex(of: "/") {
            guard let parsed = Transport(rawValue: rest[rest.index(after: slash)...].lowercased()) else {
                throw SwiftletError(.invalidArgument, "'\(text)': the protocol after '/' must be tcp or udp")
            }
            transport = parsed
            rest = rest[..<slash]
        }
        var address = "127.0.0.1"
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]"), rest[rest.index(after: close)...].hasPrefix(":") else {
                throw SwiftletError(.invalidArgument, "'\(text)': an IPv6 host address in brackets must be followed by ':' (\(usage))")
            }
            address = String(rest[rest.index(after: rest.startIndex)..<close])
            rest = rest[rest.index(close, offsetBy: 2)...]
        }
        let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
        switch parts.count {
        case 2: break
        case 3 where !text.hasPrefix("["): address = String(parts[0])
        default:
            throw SwiftletError(.invalidArgument, "'\(text)' is not a port publication (\(usage); an IPv6 host address goes in brackets)")
        }
        do {
            hostAddress = try IPAddress(parsing: address)
        } catch {
            throw SwiftletError(.invalidArgument, "'\(text)': '\(address)' is not a host IP address (\(usage))")
        }
        func port(_ field: Substring, _ role: String) throws(SwiftletError) -> UInt16 {
            guard (1...5).contains(field.count), field.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let value = UInt16(field), value > 0 else {
                throw SwiftletError(.invalidArgument, "'\(text)': the \(role) port '\(field)' must be a number from 1 to 65535")
            }
            return value
        }
        hostPort = try port(parts[parts.count - 2], "host")
        guestPort = try port(parts[parts.count - 1], "guest")
    }

    /// The canonical text: `127.0.0.1:8080:80/tcp`, `[::1]:8080:80/udp`.
    public var description: String {
        let host = hostAddress.isV4 ? "\(hostAddress)" : "[\(hostAddress)]"
        return "\(host):\(hostPort):\(guestPort)/\(transport.rawValue)"
    }
}

/// A machine's network: what its record, its snapshot and the library's machine configuration hold.
/// No network at all (no device) unless `allowAll`, an allow-list or a publication asks for one.
/// `--net` alone is `allowAll` (open mode); any allowed host or CIDR makes it an allow-list (with
/// or without `--net`); publishing alone gives a device with no outbound access.
public struct NetworkConfiguration: Codable, Sendable, Equatable {
    public var allowAll: Bool
    public var allowedHosts: [HostPattern]
    public var allowedCIDRs: [CIDR]
    public var published: [PortPublication]

    public init(allowAll: Bool = false, allowedHosts: [HostPattern] = [], allowedCIDRs: [CIDR] = [], published: [PortPublication] = []) {
        self.allowAll = allowAll
        self.allowedHosts = allowedHosts
        self.allowedCIDRs = allowedCIDRs
        self.published = published
    }

    /// Whether the machine gets a network device at all.
    public var hasNetwork: Bool { allowAll || isAllowList || !published.isEmpty }

    /// Whether outbound traffic is limited to the allowed hosts and CIDRs (including none at all,
    /// when only ports are published).
    public var isAllowList: Bool { !allowedHosts.isEmpty || !allowedCIDRs.isEmpty }

    /// Whether outbound traffic is open (`--net` without an allow-list).
    public var isOpen: Bool { allowAll && !isAllowList }

    /// One line for `machine ls`/`status`: "none", "open", "allow example.com, 10.0.0.0/8",
    /// "inbound only", then the published ports.
    public var summary: String {
        var text = !hasNetwork ? "none" : isOpen ? "open"
            : isAllowList ? "allow " + (allowedHosts.map(\.description) + allowedCIDRs.map(\.description)).joined(separator: ", ")
            : "inbound only"
        if !published.isEmpty { text += "; ports " + published.map(\.description).joined(separator: ", ") }
        return text
    }

    enum CodingKeys: String, CodingKey { case allowAll, allowedHosts, allowedCIDRs, published }

    /// Missing keys read as their defaults, so records written before a field existed still load.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        allowAll = try container.decodeIfPresent(Bool.self, forKey: .allowAll) ?? false
        allowedHosts = try container.decodeIfPresent([HostPattern].self, forKey: .allowedHosts) ?? []
        allowedCIDRs = try container.decodeIfPresent([CIDR].self, forKey: .allowedCIDRs) ?? []
        published = try container.decodeIfPresent([PortPublication].self, forKey: .published) ?? []
    }
}

/// The addresses of a guest's network, as passt is told them and the agent configures them.
public struct GuestNetwork: Sendable, Equatable {
    public var guestMAC: MACAddress
    /// The MAC address passt uses as its own (the gateway's), passt's `-M`.
    public var gatewayMAC: MACAddress
    public var guestAddress: IPAddress
    public var prefixLength: Int
    /// The gateway; passt maps it to the host's loopback: `host.swiftlet.internal`.
    public var gateway: IPAddress
    /// The resolver the guest uses; passt forwards its queries to the host's resolver.
    public var dns: IPAddress
    public var mtu: Int

    /// The name that reaches the host's loopback through the gateway.
    public static let hostName = "host.swiftlet.internal"

    /// 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3, MAC 02:53:57:00:00:01 (passt 02:53:57:00:00:02), MTU 65520.
    public static let `default` = GuestNetwork(
        guestMAC: try! MACAddress([0x02, 0x53, 0x57, 0, 0, 0x01]), gatewayMAC: try! MACAddress([0x02, 0x53, 0x57, 0, 0, 0x02]),
        guestAddress: .v4(0x0A00_020F), prefixLength: 24, gateway: .v4(0x0A00_0202), dns: .v4(0x0A00_0203), mtu: 65520)

    public init(guestMAC: MACAddress, gatewayMAC: MACAddress, guestAddress: IPAddress, prefixLength: Int,
                gateway: IPAddress, dns: IPAddress, mtu: Int) {
        self.guestMAC = guestMAC
        self.gatewayMAC = gatewayMAC
        self.guestAddress = guestAddress
        self.prefixLength = prefixLength
        self.gateway = gateway
        self.dns = dns
        self.mtu = mtu
    }
}
