@testable import SwiftletNet

/// The egress filter: a sequence of frames, each outbound (from the guest) or inbound (to it),
/// against a filter with a mixed configuration (allowed names and wildcards, CIDRs of both
/// families, host.swiftlet.internal, published TCP and UDP ports) and one in open mode, on a
/// clock the input moves. Input: records of a control byte (bit 0: inbound; bits 1–3: seconds
/// ×20 to advance the clock first), a 16-bit little-endian length, then the frame. Checks: no
/// trap; only outbound frames get replies; every reply is a well-formed frame to the guest's
/// MAC with valid IPv4 header and transport checksums; the tables stay within their capacity.
enum EgressFilterFuzz {
    static let mixed = NetworkConfiguration(
        allowAll: true, allowedHosts: ["*.example.com", "api.test", "host.swiftlet.internal"].map { try! HostPattern(parsing: $0) },
        allowedCIDRs: ["192.0.2.0/24", "2001:db8::/32", "10.9.0.0/16"].map { try! CIDR(parsing: $0) },
        published: ["8080:80", "5353:53/udp"].map { try! PortPublication(parsing: $0) })
    static let maximumFrames = 64

    final class Clock: @unchecked Sendable { var now: UInt64 = 1_000_000_000_000 }

    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let clock = Clock()  // used by this thread only
        let filters = [mixed, NetworkConfiguration(allowAll: true)].map {
            EgressFilter(configuration: $0, clock: { clock.now }, log: { precondition(!$0.isEmpty, "an empty log line") })
        }
        var frames = 0
        while !input.isAtEnd && frames < maximumFrames {
            frames += 1
            let control = input.byte()
            clock.now += UInt64(control >> 1 & 7) * 20_000_000_000
            let frame = input.take(Int(input.integer(UInt16.self)))
            for filter in filters {
                let inbound = control & 1 != 0
                let verdict = frame.withUnsafeBytes { inbound ? filter.inbound($0) : filter.outbound($0) }
                if case .reply(let replies) = verdict {
                    precondition(!inbound, "an inbound frame got a reply")
                    for reply in replies { check(reply, answering: frame) }
                }
                let counts = filter.state.withLock { [$0.learned.count, $0.pending.count, $0.flows.count, $0.logged.count] }
                precondition(counts.allSatisfy { $0 <= EgressFilter.tableCapacity }, "a filter table exceeds its capacity: \(counts)")
            }
        }
    }

    /// A reply goes back to the sender's MAC, parses, and has valid checksums.
    static func check(_ reply: [UInt8], answering frame: [UInt8]) {
        precondition(reply.count >= 14 && reply[0..<6] == frame[6..<12], "a reply not addressed to the guest's MAC")
        reply.withUnsafeBytes { buffer in
            guard let ethernet = EthernetFrame(buffer), let ip = IPPacket(ethernet.payload, ipv6: ethernet.etherType == EtherType.ipv6),
                  ip.payload.count >= 8 else { preconditionFailure("a reply that does not parse") }
            var checksum = InternetChecksum()
            if ip.source.isV4 {
                checksum.add(ip.bytes.slice(0..<ip.headerLength))
                precondition(checksum.value == 0, "a reply with a bad IPv4 header checksum")
                checksum = InternetChecksum()
            }
            if ip.transport != IPProtocol.icmp {
                checksum.addPseudoHeader(source: ip.source, destination: ip.destination, protocol: ip.transport, length: ip.payload.count)
            }
            checksum.add(ip.payload)
            precondition(checksum.value == 0, "a reply with a bad transport checksum")
        }
    }

    // MARK: seeds

    /// One IP frame from `source` to `destination` (toward the guest's MAC when `inbound`).
    static func frame(_ source: String, _ destination: String, _ transport: UInt8, _ payload: [UInt8], checksumAt: Int, inbound: Bool = false) -> [UInt8] {
        let guest: [UInt8] = [0x02, 0x53, 0x57, 0, 0, 0x01], gateway: [UInt8] = [0x02, 0x53, 0x57, 0, 0, 0x02]
        let template = (inbound ? gateway + guest : guest + gateway) + [0, 0]  // the builder swaps the addresses
        return template.withUnsafeBytes {
            FrameBuilder.frame(answering: EthernetFrame($0)!, source: try! IPAddress(parsing: source), destination: try! IPAddress(parsing: destination),
                               protocol: transport, payload: payload, checksumAt: checksumAt, pseudoHeader: transport != IPProtocol.icmp)
        }
    }

    static func tcp(_ source: String, _ destination: String, _ sport: UInt16, _ dport: UInt16, flags: UInt8, inbound: Bool = false) -> [UInt8] {
        frame(source, destination, IPProtocol.tcp, FrameBuilder.be16(Int(sport)) + FrameBuilder.be16(Int(dport)) + [0, 0, 0, 9, 0, 0, 0, 0, 0x50, flags]
              + [0xFF, 0xFF, 0, 0, 0, 0], checksumAt: 16, inbound: inbound)
    }

    static func udp(_ source: String, _ destination: String, _ sport: UInt16, _ dport: UInt16, _ data: [UInt8], inbound: Bool = false) -> [UInt8] {
        frame(source, destination, IPProtocol.udp, FrameBuilder.be16(Int(sport)) + FrameBuilder.be16(Int(dport)) + FrameBuilder.be16(8 + data.count)
              + [0, 0] + data, checksumAt: 6, inbound: inbound)
    }

    static func name(_ text: String) -> [UInt8] { text.split(separator: ".").flatMap { [UInt8($0.count)] + Array($0.utf8) } + [0] }

    static func query(_ id: UInt16, _ text: String, type: UInt8 = 1) -> [UInt8] {
        FrameBuilder.be16(Int(id)) + [1, 0, 0, 1, 0, 0, 0, 0, 0, 0] + name(text) + [0, type, 0, 1]
    }

    static func answer(_ id: UInt16, _ text: String, _ address: [UInt8], ttl: UInt8 = 30) -> [UInt8] {
        FrameBuilder.be16(Int(id)) + [0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0] + name(text) + [0, address.count == 4 ? 1 : 28, 0, 1]
            + [0xC0, 12, 0, 5, 0, 1, 0, 0, 0, ttl, 0, 6] + [3] + Array("cdn".utf8) + [0xC0, 12]
            + [0xC0, UInt8(12 + name(text).count + 4 + 12), 0, address.count == 4 ? 1 : 28, 0, 1, 0, 0, 0, ttl] + FrameBuilder.be16(address.count) + address
    }

    /// A record for the input: control byte, length, frame.
    static func record(_ frame: [UInt8], inbound: Bool = false, advance: UInt8 = 0) -> [UInt8] {
        [advance << 1 | (inbound ? 1 : 0)] + littleEndian(UInt16(frame.count)) + frame
    }

    static func seeds() -> [[UInt8]] {
        let guest = "10.0.2.15", guest6 = "2001:db8:1::15", dns = "10.0.2.3"
        let arp: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0x53, 0x57, 0, 0, 0x01, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1,
                            0x02, 0x53, 0x57, 0, 0, 0x01, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 10, 0, 2, 2]
        let ping = frame(guest, "198.51.100.1", IPProtocol.icmp, [8, 0, 0, 0, 0, 1, 0, 1, 7, 7], checksumAt: 2)
        let ping6 = frame(guest6, "2001:db9::1", IPProtocol.icmpv6, [128, 0, 0, 0, 0, 1, 0, 1], checksumAt: 2)
        let learn = [udp(guest, dns, 3333, 53, query(1, "www.example.com")),
                     udp(dns, guest, 53, 3333, answer(1, "www.example.com", [203, 0, 113, 5]), inbound: true),
                     tcp(guest, "203.0.113.5", 40000, 443, flags: 0x02)]
        return [
            [arp, tcp(guest, "192.0.2.1", 40000, 443, flags: 0x02), tcp(guest, "198.51.100.1", 40000, 443, flags: 0x02),
             tcp(guest, "169.254.169.254", 40000, 80, flags: 0x02), ping, ping6].flatMap { record($0) },
            [udp(guest, dns, 3333, 53, query(7, "denied.org")), udp(guest, dns, 3334, 53, query(8, "host.swiftlet.internal")),
             udp(guest, "8.8.8.8", 3335, 53, query(9, "api.test")), tcp(guest, dns, 40001, 53, flags: 0x02)].flatMap { record($0) },
            record(learn[0]) + record(learn[1], inbound: true) + record(learn[2]) + record(learn[2], advance: 7) + record(learn[2], advance: 7),
            record(udp(guest, dns, 3333, 53, query(2, "a.example.com", type: 28)))
                + record(udp(dns, guest, 53, 3333, answer(2, "a.example.com", [0xFD] + [UInt8](repeating: 0, count: 14) + [1]), inbound: true), inbound: true),
            record(tcp("10.0.2.2", guest, 50000, 80, flags: 0x02, inbound: true), inbound: true) + record(tcp(guest, "10.0.2.2", 80, 50000, flags: 0x12))
                + record(udp("10.0.2.2", guest, 41000, 53, [1], inbound: true), inbound: true) + record(udp(guest, "10.0.2.2", 53, 41000, [2]))
                + record(tcp(guest, "198.51.100.1", 80, 443, flags: 0x02)),
            record(udp(guest6, "2001:db9::53", 5000, 9, Array(repeating: 1, count: 600))) + record(ping6, advance: 3),
        ]
    }
}
