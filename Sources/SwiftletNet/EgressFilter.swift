import Synchronization
import SwiftletSystem

/// The network policy of one machine, frame by frame, between its NIC and passt.
///
/// Outbound (frames the guest sends):
/// - ARP, neighbour discovery (ICMPv6 133–137 with hop limit 255: to the router and neighbours,
///   passt answers them), MLD and other ICMPv6 to link-scope multicast, and DHCP/DHCPv6 to
///   passt pass in every mode.
/// - DNS (UDP 53 to `GuestNetwork.dns`) is read: `host.swiftlet.internal` is answered here (A:
///   the gateway when allowed, else NXDOMAIN); under an allow-list a name not allowed gets an
///   NXDOMAIN made here and is never forwarded, an allowed one passes and its answer is awaited.
///   Under an allow-list, DNS over TCP to the resolver gets a reset (only UDP is read), and DNS
///   (UDP or TCP 53) to any other address is blocked even where a CIDR allows that address: a
///   resolver of the guest's choosing would bypass the name check. Open mode passes both.
/// - Everything else by destination: open mode passes all but cloud metadata (169.254.0.0/16,
///   fd00:ec2::254); an allow-list passes CIDR matches, addresses learned from DNS answers (until
///   their TTL ends), the gateway when `host.swiftlet.internal` is allowed, and the guest's side of
///   flows that reached a published port.
/// - Blocked: a TCP segment gets a reset (a SYN: ECONNREFUSED at once), UDP an ICMP port
///   unreachable, an ICMP echo an ICMP administratively prohibited (ICMPv6 type 1); nothing is
///   sent about multicast or broadcast, other ICMP or protocols, or fragments (dropped). Each
///   blocked attempt is logged, once per destination per `logInterval`.
/// - Fragments: judged by destination address only (a later fragment has no ports); fragments to
///   the resolver are dropped under an allow-list (a query must be read whole).
///
/// Inbound (frames passt hands the guest): DNS answers from the resolver to a query let through
/// teach the A/AAAA addresses that answer its name (through CNAMEs), TTL clamped to 60–3600 s;
/// addresses in special ranges (loopback, private, link-local, CGNAT, ULA, multicast, ...) are
/// not learned unless a CIDR allows them (DNS rebinding). A TCP SYN (or UDP datagram) to a
/// published guest port starts a flow whose replies pass. Inbound frames otherwise pass.
///
/// Tables (learned addresses, pending queries, flows, log suppression) are bounded by
/// `tableCapacity`, the oldest entry dropped first. Malformed frames (truncated headers, lengths
/// past the bytes there, VLAN tags, unknown EtherTypes) are dropped in both directions.
///
/// Thread-safe: the tables are behind one mutex. The common passing frame costs a few header
/// reads and at most one table lookup, with no allocation.
public final class EgressFilter: FrameFilter {
    public static let tableCapacity = 4096
    /// The bounds a learned address's TTL is clamped to, in seconds.
    public static let ttlRange: ClosedRange<UInt32> = 60...3600
    /// How long a pending query waits for its answer, a published flow lives without traffic,
    /// and a logged destination stays quiet (nanoseconds).
    static let queryLifetime: UInt64 = 30_000_000_000, flowIdleLifetime: UInt64 = 3_600_000_000_000
    static let logInterval: UInt64 = 10_000_000_000
    /// The TTL of the host.swiftlet.internal answer (seconds).
    static let hostNameTTL: UInt32 = 600

    struct State {
        var learned = ExpiringTable<IPAddress, Void>(capacity: EgressFilter.tableCapacity)
        var pending = ExpiringTable<QueryKey, DNSName>(capacity: EgressFilter.tableCapacity)
        var flows = ExpiringTable<FlowKey, Void>(capacity: EgressFilter.tableCapacity)
        var logged = ExpiringTable<LogKey, Void>(capacity: EgressFilter.tableCapacity)
    }

    let configuration: NetworkConfiguration
    let network: GuestNetwork
    let isOpen: Bool
    let hostNameAllowed: Bool
    let publishedTCP: Set<UInt16>, publishedUDP: Set<UInt16>
    let clock: @Sendable () -> UInt64
    let log: @Sendable (String) -> Void
    let state = Mutex(State())

    public init(configuration: NetworkConfiguration, network: GuestNetwork = .default,
                clock: @escaping @Sendable () -> UInt64 = { MonotonicClock.now }, log: @escaping @Sendable (String) -> Void) {
        self.configuration = configuration
        self.network = network
        self.clock = clock
        self.log = log
        isOpen = configuration.isOpen
        hostNameAllowed = isOpen || configuration.allowedHosts.contains { $0.matches(GuestNetwork.hostName) }
        publishedTCP = Set(configuration.published.filter { $0.transport == .tcp }.map(\.guestPort))
        publishedUDP = Set(configuration.published.filter { $0.transport == .udp }.map(\.guestPort))
    }

    // MARK: outbound

    public func outbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
        guard let ethernet = EthernetFrame(frame) else { return .drop }
        switch ethernet.etherType {
        case EtherType.arp: return ARPPacket(ethernet.payload) == nil ? .drop : .pass
        case EtherType.ipv4, EtherType.ipv6:
            guard let ip = IPPacket(ethernet.payload, ipv6: ethernet.etherType == EtherType.ipv6) else { return .drop }
            return outbound(ethernet, ip)
        default: return .drop  // VLAN tags (0x8100, 0x88A8) included: the guest has no VLANs
        }
    }

    private func outbound(_ ethernet: EthernetFrame, _ ip: IPPacket) -> FilterVerdict {
        let now = clock()
        if ip.isFragment {
            if !isOpen && ip.destination == network.dns { return .drop }
            if ip.isLaterFragment {
                return allows(ip.destination, flow: nil, now: now) ? .pass : blocked(ip, nil, now, answer: nil)
            }
        }
        switch ip.transport {
        case IPProtocol.udp:
            guard let udp = UDPDatagram(ip.payload) else { return .drop }
            if isDHCP(ip, udp) { return .pass }
            if udp.destinationPort == 53 {
                if ip.destination == network.dns && !ip.isFragment { return query(ethernet, ip, udp, now) }
                if !isOpen { return blocked(ip, 53, now, answer: unreachable(ethernet, ip, port: true), reason: "DNS to a server other than \(network.dns)") }
            }
            let flow = FlowKey(remote: ip.destination, remotePort: udp.destinationPort, guestPort: udp.sourcePort, transport: IPProtocol.udp)
            if allows(ip.destination, flow: flow, now: now) { return .pass }
            return blocked(ip, udp.destinationPort, now, answer: ip.isFragment ? nil : unreachable(ethernet, ip, port: true))
        case IPProtocol.tcp:
            guard let tcp = TCPSegment(ip.payload) else { return .drop }
            func reset() -> [UInt8]? { ip.isFragment ? nil : FrameBuilder.reset(answering: ethernet, ip: ip, tcp: tcp) }
            if tcp.destinationPort == 53 && !isOpen {
                let reason = ip.destination == network.dns ? "DNS over TCP (only DNS over UDP is read under an allow-list)"
                    : "DNS to a server other than \(network.dns)"
                return blocked(ip, 53, now, answer: reset(), reason: reason)
            }
            let flow = FlowKey(remote: ip.destination, remotePort: tcp.destinationPort, guestPort: tcp.sourcePort, transport: IPProtocol.tcp)
            if allows(ip.destination, flow: flow, now: now) { return .pass }
            return blocked(ip, tcp.destinationPort, now, answer: reset())
        case IPProtocol.icmp, IPProtocol.icmpv6:
            guard ip.isLaterFragment || ICMPMessage(ip.payload) != nil else { return .drop }
            let v6 = ip.transport == IPProtocol.icmpv6
            guard v6 == !ip.source.isV4 else { return allows(ip.destination, flow: nil, now: now) ? .pass : blocked(ip, nil, now, answer: nil) }
            if v6, !ip.isFragment, let icmp = ICMPMessage(ip.payload) {
                if ICMPMessage.v6NeighbourDiscovery.contains(icmp.type) && ip.bytes[7] == 255 { return .pass }
                if SpecialRanges.isLinkLocalMulticast(ip.destination) { return .pass }  // MLD reports, NDP to groups
            }
            if allows(ip.destination, flow: nil, now: now) { return .pass }
            let echo = !ip.isFragment && ICMPMessage(ip.payload)?.type == (v6 ? ICMPMessage.v6EchoRequest : ICMPMessage.echoRequest)
            return blocked(ip, nil, now, answer: echo ? unreachable(ethernet, ip, port: false) : nil)
        default:
            return allows(ip.destination, flow: nil, now: now) ? .pass : blocked(ip, nil, now, answer: nil)
        }
    }

    /// DHCP (68 → 67) and DHCPv6 (546 → 547): passt's own.
    private func isDHCP(_ ip: IPPacket, _ udp: UDPDatagram) -> Bool {
        ip.source.isV4 ? udp.sourcePort == 68 && udp.destinationPort == 67 : udp.sourcePort == 546 && udp.destinationPort == 547
    }

    /// Whether the policy lets the guest send to `destination` (on `flow`, for TCP and UDP).
    private func allows(_ destination: IPAddress, flow: FlowKey?, now: UInt64) -> Bool {
        if isOpen { return !SpecialRanges.metadata.contains { $0.contains(destination) } }
        if configuration.allowedCIDRs.contains(where: { $0.contains(destination) }) { return true }
        if hostNameAllowed && destination == network.gateway { return true }
        return state.withLock { state in
            if state.learned.value(destination, now: now) != nil { return true }
            guard let flow, state.flows.count > 0 else { return false }
            return state.flows.extend(flow, to: now &+ Self.flowIdleLifetime, now: now)
        }
    }

    private func unreachable(_ ethernet: EthernetFrame, _ ip: IPPacket, port: Bool) -> [UInt8] {
        let code = ip.source.isV4 ? (port ? ICMPCode.portUnreachable : ICMPCode.prohibited)
            : (port ? ICMPCode.v6PortUnreachable : ICMPCode.v6Prohibited)
        return FrameBuilder.unreachable(answering: ethernet, ip: ip, code: code)
    }

    /// A blocked attempt: logged (bounded), and answered with `answer` unless its destination is
    /// a group (multicast, broadcast) or it has none.
    private func blocked(_ ip: IPPacket, _ port: UInt16?, _ now: UInt64, answer: [UInt8]?, reason: String? = nil) -> FilterVerdict {
        let name = [IPProtocol.tcp: "tcp", IPProtocol.udp: "udp", IPProtocol.icmp: "icmp", IPProtocol.icmpv6: "icmpv6"][ip.transport]
            ?? "protocol \(ip.transport)"
        let target = port.map { ip.destination.isV4 ? "\(ip.destination):\($0)" : "[\(ip.destination)]:\($0)" } ?? "\(ip.destination)"
        note(.destination(ip.destination, port ?? 0, ip.transport), now: now,
             "blocked \(name) to \(target): \(reason ?? (isOpen ? "cloud metadata" : "not allowed"))")
        guard let answer, !SpecialRanges.isGroup(ip.destination) else { return .drop }
        return .reply([answer])
    }

    /// Logs `message` unless `key` was logged less than `logInterval` ago.
    private func note(_ key: LogKey, now: UInt64, _ message: @autoclosure () -> String) {
        let fresh = state.withLock { state in
            guard state.logged.value(key, now: now) == nil else { return false }
            state.logged.insert(key, (), expiry: now &+ Self.logInterval, now: now)
            return true
        }
        if fresh { log(message()) }
    }

    // MARK: DNS

    /// A query to the resolver: answered here (host.swiftlet.internal, denied names), or passed
    /// and awaited (allowed names).
    private func query(_ ethernet: EthernetFrame, _ ip: IPPacket, _ udp: UDPDatagram, _ now: UInt64) -> FilterVerdict {
        guard let message = DNSMessage(udp.data, readAnswers: false), !message.isResponse, message.questions.count == 1 else {
            return isOpen ? .pass : .drop
        }
        let question = message.questions[0], name = question.name.text
        func answer(_ code: UInt8, _ records: [[UInt8]] = []) -> FilterVerdict {
            .reply([FrameBuilder.udpReply(answering: ethernet, ip: ip, udp: udp,
                                          data: DNSMessage.reply(to: message, responseCode: code, answers: records))])
        }
        if name == GuestNetwork.hostName && message.opcode == 0 {
            guard hostNameAllowed else {
                note(.name(GuestNetwork.hostName), now: now, "denied DNS query for \(GuestNetwork.hostName): not allowed")
                return answer(DNSMessage.nameError)
            }
            let matches = question.type == (network.gateway.isV4 ? DNSType.a : DNSType.aaaa) && question.class == 1
            return answer(DNSMessage.noError, matches ? [DNSMessage.addressRecord(network.gateway, ttl: Self.hostNameTTL)] : [])
        }
        if isOpen { return .pass }
        guard message.opcode == 0 else { return answer(DNSMessage.refused) }
        guard let name, configuration.allowedHosts.contains(where: { $0.matches(name) }) else {
            let shown = name ?? "a name with characters a host name cannot have"
            note(.name(name ?? ""), now: now, "denied DNS query for \(shown): not an allowed host (answered NXDOMAIN, not forwarded)")
            return answer(DNSMessage.nameError)
        }
        state.withLock { state in
            state.pending.insert(QueryKey(id: message.id, guestPort: udp.sourcePort), question.name,
                                 expiry: now &+ Self.queryLifetime, now: now)
        }
        return .pass
    }

    // MARK: inbound

    public func inbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict {
        guard let ethernet = EthernetFrame(frame) else { return .drop }
        switch ethernet.etherType {
        case EtherType.arp: return ARPPacket(ethernet.payload) == nil ? .drop : .pass
        case EtherType.ipv4, EtherType.ipv6:
            guard let ip = IPPacket(ethernet.payload, ipv6: ethernet.etherType == EtherType.ipv6) else { return .drop }
            if !isOpen && !ip.isFragment { inbound(ip) }
            return .pass
        default: return .drop
        }
    }

    /// What an inbound packet teaches under an allow-list: answers to awaited queries, flows to published ports.
    private func inbound(_ ip: IPPacket) {
        let now = clock()
        if ip.transport == IPProtocol.tcp, let tcp = TCPSegment(ip.payload), publishedTCP.contains(tcp.destinationPort) {
            let flow = FlowKey(remote: ip.source, remotePort: tcp.sourcePort, guestPort: tcp.destinationPort, transport: IPProtocol.tcp)
            state.withLock { state in
                if !state.flows.extend(flow, to: now &+ Self.flowIdleLifetime, now: now) && tcp.isInitialSYN {
                    state.flows.insert(flow, (), expiry: now &+ Self.flowIdleLifetime, now: now)
                }
            }
        } else if ip.transport == IPProtocol.udp, let udp = UDPDatagram(ip.payload) {
            if ip.source == network.dns && udp.sourcePort == 53 {
                learn(from: udp, now: now)
            } else if publishedUDP.contains(udp.destinationPort) {
                let flow = FlowKey(remote: ip.source, remotePort: udp.sourcePort, guestPort: udp.destinationPort, transport: IPProtocol.udp)
                state.withLock { state in
                    if !state.flows.extend(flow, to: now &+ Self.flowIdleLifetime, now: now) {
                        state.flows.insert(flow, (), expiry: now &+ Self.flowIdleLifetime, now: now)
                    }
                }
            }
        }
    }

    /// Learns the addresses in an answer to a query that was let through.
    private func learn(from udp: UDPDatagram, now: UInt64) {
        guard let message = DNSMessage(udp.data), message.isResponse, message.questions.count == 1 else { return }
        let key = QueryKey(id: message.id, guestPort: udp.destinationPort)
        let asked = state.withLock { state -> DNSName? in
            guard let name = state.pending.value(key, now: now), name.sameName(as: message.questions[0].name) else { return nil }
            state.pending.remove(key)
            return name
        }
        guard let asked else { return }
        var refused: [IPAddress] = []
        state.withLock { state in
            for (address, ttl) in message.addresses(answering: asked) {
                if SpecialRanges.notLearned.contains(where: { $0.contains(address) })
                    && !configuration.allowedCIDRs.contains(where: { $0.contains(address) }) {
                    refused.append(address)
                    continue
                }
                let seconds = UInt64(min(max(ttl, Self.ttlRange.lowerBound), Self.ttlRange.upperBound))
                let expiry = now &+ seconds * 1_000_000_000
                if !state.learned.extend(address, to: expiry, now: now) {
                    state.learned.insert(address, (), expiry: expiry, now: now)
                }
            }
        }
        for address in refused {
            note(.rebinding(address), now: now,
                 "not allowing \(address) for \(asked.text ?? "?"): a special-purpose address in a DNS answer (rebinding); allow it with --allow-cidr")
        }
    }
}
