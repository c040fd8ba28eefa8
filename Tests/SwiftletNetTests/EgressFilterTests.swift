import Testing
@testable import SwiftletNet

@Suite struct EgressFilterTests {
    typealias F = TestFrames
    static let open = NetworkConfiguration(allowAll: true)

    /// The TCP flags and sequence/acknowledgment numbers of a reset the filter made.
    func resetFields(_ reply: (proto: UInt8, src: [UInt8], dst: [UInt8], payload: [UInt8])?) -> (flags: UInt8, seq: UInt32, ack: UInt32)? {
        guard let reply, reply.proto == 6, reply.payload.count == 20 else { return nil }
        let p = reply.payload
        let seq = UInt32(p[4]) << 24 | UInt32(p[5]) << 16 | UInt32(p[6]) << 8 | UInt32(p[7])
        let ack = UInt32(p[8]) << 24 | UInt32(p[9]) << 16 | UInt32(p[10]) << 8 | UInt32(p[11])
        return (p[13], seq, ack)
    }

    /// The DNS message in a UDP reply from the resolver to the guest's port 33333.
    func dnsReply(_ reply: (proto: UInt8, src: [UInt8], dst: [UInt8], payload: [UInt8])?) -> [UInt8]? {
        guard let reply, reply.proto == 17, reply.src == F.address("10.0.2.3"), reply.dst == F.address(F.guest4),
              Array(reply.payload[0..<4]) == [0, 53, 0x82, 0x35] else { return nil }
        return Array(reply.payload[8...])
    }

    @Test func arpNDPAndDHCPPassEvenWithNothingAllowed() {
        let tested = FilterUnderTest(.allow(published: ["8080:80"]))
        #expect(tested.out(F.arp()) == .pass && tested.in(F.arp(operation: 2)) == .pass)
        let solicitation = F.ethernet(0x86DD, F.ipv6("fe80::1", "ff02::2", 58, F.icmp(133, 0, [0, 0, 0, 0], v6: ("fe80::1", "ff02::2")), hopLimit: 255))
        #expect(tested.out(solicitation) == .pass)
        let neighbour = F.ethernet(0x86DD, F.ipv6("fe80::1", "fe80::2", 58, F.icmp(135, 0, [UInt8](repeating: 0, count: 20), v6: ("fe80::1", "fe80::2")), hopLimit: 255))
        #expect(tested.out(neighbour) == .pass)
        let offLink = F.ethernet(0x86DD, F.ipv6("fe80::1", "fe80::2", 58, F.icmp(135, 0, [UInt8](repeating: 0, count: 20), v6: ("fe80::1", "fe80::2")), hopLimit: 64))
        #expect(tested.out(offLink) == .drop)
        #expect(tested.out(F.ip("0.0.0.0", "255.255.255.255", 17, F.udp("0.0.0.0", "255.255.255.255", 68, 67, [1]))) == .pass)
        #expect(tested.out(F.ip("fe80::1", "ff02::1:2", 17, F.udp("fe80::1", "ff02::1:2", 546, 547, [1]))) == .pass)
    }

    @Test func vlanTagsAndUnknownTypesAreDropped() {
        let tested = FilterUnderTest(Self.open)
        let tagged = F.gatewayMAC + F.guestMAC + [0x81, 0x00, 0x00, 0x05] + [0x08, 0x00] + F.ipv4(F.guest4, "192.0.2.1", 17, F.udp(F.guest4, "192.0.2.1", 1, 2, []))
        #expect(tested.out(tagged) == .drop && tested.in(tagged) == .drop)
        #expect(tested.out(F.ethernet(0x88CC, [UInt8](repeating: 0, count: 40))) == .drop)
        #expect(tested.out([]) == .drop && tested.in([]) == .drop)
    }

    @Test func openModePassesAllButMetadata() {
        let tested = FilterUnderTest(Self.open)
        #expect(tested.out(F.syn(to: "192.0.2.7", port: 443)) == .pass)
        #expect(tested.out(F.syn(to: "2001:db8::7", port: 443, from: F.guest6)) == .pass)
        #expect(tested.out(F.udpFrame(to: "8.8.8.8", port: 53)) == .pass)
        #expect(tested.out(F.ping(to: "192.0.2.7")) == .pass && tested.out(F.ping(to: "2001:db8::7", from: F.guest6)) == .pass)
        #expect(tested.out(F.dnsFrame(F.dnsQuery("anything.example"))) == .pass)
        let reset = resetFields(tested.reply(F.syn(to: "169.254.169.254", port: 80)))
        #expect(reset?.flags == 0x14 && reset?.seq == 0 && reset?.ack == 1001)
        #expect(tested.reply(F.syn(to: "fd00:ec2::254", port: 80, from: F.guest6)) != nil)
        #expect(tested.log.all == ["blocked tcp to 169.254.169.254:80: cloud metadata", "blocked tcp to [fd00:ec2::254]:80: cloud metadata"])
    }

    @Test func hostNameIsAnsweredHereWhenAllowed() throws {
        for configuration in [Self.open, .allow(["host.swiftlet.internal"])] {
            let tested = FilterUnderTest(configuration)
            let message = try #require(dnsReply(tested.reply(F.dnsFrame(F.dnsQuery(id: 7, "HOST.swiftlet.internal")))))
            #expect(Array(message[0..<8]) == [0, 7, 0x81, 0x80, 0, 1, 0, 1])
            #expect(Array(message.suffix(4)) == [10, 0, 2, 2])
            let none = try #require(dnsReply(tested.reply(F.dnsFrame(F.dnsQuery("host.swiftlet.internal", type: 28)))))
            #expect(Array(none[2..<8]) == [0x81, 0x80, 0, 1, 0, 0])
            #expect(tested.out(F.syn(to: "10.0.2.2", port: 8000)) == .pass)
        }
        let denied = FilterUnderTest(.allow(["example.com"]))
        let message = try #require(dnsReply(denied.reply(F.dnsFrame(F.dnsQuery("host.swiftlet.internal")))))
        #expect(Array(message[2..<8]) == [0x81, 0x83, 0, 1, 0, 0])
        #expect(denied.reply(F.syn(to: "10.0.2.2", port: 8000)) != nil)
    }

    @Test func deniedNamesGetNXDOMAINAndAreNeverForwarded() throws {
        let tested = FilterUnderTest(.allow(["*.example.com"]))
        #expect(tested.out(F.dnsFrame(F.dnsQuery("a.b.example.com"))) == .pass)
        for name in ["example.com", "badexample.com", "evil.org"] {
            let query = F.dnsQuery(id: 0x4242, name)
            let message = try #require(dnsReply(tested.reply(F.dnsFrame(query))), "\(name)")
            #expect(Array(message[0..<12]) == [0x42, 0x42, 0x81, 0x83, 0, 1, 0, 0, 0, 0, 0, 0])
            #expect(Array(message[12...]) == Array(query[12...]))
        }
        // A label with a dot in it would match "*.example.com" as text but is another name to a resolver.
        let dotted = F.be16(1) + [1, 0, 0, 1, 0, 0, 0, 0, 0, 0] + [5] + Array("x.evi".utf8) + F.dnsName("example.com") + [0, 1, 0, 1]
        #expect(dnsReply(tested.reply(F.dnsFrame(dotted))) != nil)
        _ = tested.reply(F.dnsFrame(F.dnsQuery("evil.org")))
        #expect(tested.log.all.filter { $0.contains("evil.org") } == ["denied DNS query for evil.org: not an allowed host (answered NXDOMAIN, not forwarded)"])
        // Malformed queries to the resolver are dropped; other opcodes refused.
        #expect(tested.out(F.dnsFrame([1, 2, 3])) == .drop)
        var notify = F.dnsQuery("a.example.com")
        notify[2] = 0x20
        #expect(try #require(dnsReply(tested.reply(F.dnsFrame(notify))))[3] & 0x0F == 5)
    }

    @Test func dnsOverTCPAndOtherServersAreRefusedUnderAnAllowList() {
        let tested = FilterUnderTest(.allow(["example.com"], cidrs: ["8.8.8.0/24"]))
        #expect(resetFields(tested.reply(F.syn(to: "10.0.2.3", port: 53)))?.flags == 0x14)
        #expect(resetFields(tested.reply(F.syn(to: "8.8.8.8", port: 53)))?.flags == 0x14)
        let unreachable = tested.reply(F.udpFrame(to: "8.8.8.8", port: 53))
        #expect(unreachable?.proto == 1 && unreachable?.payload[0] == 3 && unreachable?.payload[1] == 3)
        #expect(tested.out(F.syn(to: "8.8.8.8", port: 443)) == .pass)
        #expect(tested.log.all.contains("blocked tcp to 10.0.2.3:53: DNS over TCP (only DNS over UDP is read under an allow-list)"))
        #expect(tested.log.all.contains("blocked udp to 8.8.8.8:53: DNS to a server other than 10.0.2.3"))
    }

    @Test func blockedAttemptsFailFastWithCheckedFrames() throws {
        let tested = FilterUnderTest(.allow(["example.com"]))
        let syn = F.syn(to: "192.0.2.7", port: 443)
        let reset = try #require(tested.reply(syn))
        #expect(reset.src == F.address("192.0.2.7") && reset.dst == F.address(F.guest4))
        #expect(Array(reset.payload[0..<4]) == [0x01, 0xBB, 0x9C, 0x40])
        #expect(resetFields(reset)?.ack == 1001)
        // A segment with ACK: <SEQ=SEG.ACK><CTL=RST>.
        let data = F.ip(F.guest4, "192.0.2.7", 6, F.tcp(F.guest4, "192.0.2.7", 40000, 443, flags: 0x18, seq: 5, ack: 777, data: [1, 2]))
        let dataReset = resetFields(tested.reply(data))
        #expect(dataReset?.flags == 0x04 && dataReset?.seq == 777)
        #expect(resetFields(tested.reply(F.syn(to: "2001:db8::7", port: 443, from: F.guest6)))?.ack == 1001)
        let rst = F.ip(F.guest4, "192.0.2.7", 6, F.tcp(F.guest4, "192.0.2.7", 40000, 443, flags: 0x04))
        #expect(tested.out(rst) == .drop)

        let udp = F.udpFrame(to: "192.0.2.7", port: 9)
        let port = try #require(tested.reply(udp))
        #expect(port.proto == 1 && Array(port.payload[0..<2]) == [3, 3] && Array(port.payload[8...]) == Array(udp[14...]))
        let port6 = try #require(tested.reply(F.udpFrame(to: "2001:db8::7", port: 9, from: F.guest6)))
        #expect(port6.proto == 58 && Array(port6.payload[0..<2]) == [1, 4])
        let ping = try #require(tested.reply(F.ping(to: "192.0.2.7")))
        #expect(ping.proto == 1 && Array(ping.payload[0..<2]) == [3, 13])
        let ping6 = try #require(tested.reply(F.ping(to: "2001:db8::7", from: F.guest6)))
        #expect(ping6.proto == 58 && Array(ping6.payload[0..<2]) == [1, 1])
        // A big datagram's quote stops at 576 bytes in all.
        let big = try #require(tested.reply(F.udpFrame(to: "192.0.2.7", port: 9, data: [UInt8](repeating: 7, count: 1400))))
        #expect(big.payload.count == 576 - 20)
        // Nothing is sent about multicast, broadcast, ICMP errors or other protocols.
        #expect(tested.out(F.udpFrame(to: "224.0.0.251", port: 5353)) == .drop)
        #expect(tested.out(F.udpFrame(to: "255.255.255.255", port: 9)) == .drop)
        #expect(tested.out(F.ip(F.guest4, "192.0.2.7", 1, F.icmp(3, 3, [UInt8](repeating: 0, count: 32)))) == .drop)
        #expect(tested.out(F.ip(F.guest4, "192.0.2.7", 132, [1, 2, 3, 4])) == .drop)
    }

    @Test func blockedAttemptsAreLoggedOncePerWhile() {
        let tested = FilterUnderTest(.allow(["example.com"]))
        for _ in 0..<5 { _ = tested.out(F.syn(to: "192.0.2.7", port: 443)) }
        _ = tested.out(F.syn(to: "192.0.2.8", port: 443))
        #expect(tested.log.all == ["blocked tcp to 192.0.2.7:443: not allowed", "blocked tcp to 192.0.2.8:443: not allowed"])
        tested.clock.advance(seconds: 11)
        _ = tested.out(F.syn(to: "192.0.2.7", port: 443))
        #expect(tested.log.all.count == 3)
    }

    @Test func metadataIsBlockedUnlessACIDRNamesIt() {
        #expect(FilterUnderTest(.allow(["example.com"])).out(F.syn(to: "169.254.169.254", port: 80)) != .pass)
        #expect(FilterUnderTest(.allow(cidrs: ["169.254.169.254/32"])).out(F.syn(to: "169.254.169.254", port: 80)) == .pass)
    }

    @Test func answersTeachAddressesForTheirClampedTTL() {
        let tested = FilterUnderTest(.allow(["api.example.com", "slow.example.com"]))
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) != .pass)
        // An answer nobody asked for teaches nothing.
        #expect(tested.in(F.dnsReplyFrame(F.dnsAnswer("api.example.com", records: [(nil, 1, 300, [93, 184, 216, 34])]))) == .pass)
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) != .pass)

        #expect(tested.out(F.dnsFrame(F.dnsQuery(id: 1, "api.example.com"))) == .pass)
        // Wrong port or wrong id: not the awaited answer.
        _ = tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 1, "api.example.com", records: [(nil, 1, 5, [93, 184, 216, 34])]), dport: 1))
        _ = tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 2, "api.example.com", records: [(nil, 1, 5, [93, 184, 216, 34])])))
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) != .pass)
        #expect(tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 1, "api.example.com", records: [(nil, 1, 5, [93, 184, 216, 34])]))) == .pass)
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) == .pass)
        #expect(tested.out(F.udpFrame(to: "93.184.216.34", port: 443)) == .pass)
        tested.clock.advance(seconds: 59)
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) == .pass)  // TTL 5 s clamped to 60
        tested.clock.advance(seconds: 2)
        #expect(tested.out(F.syn(to: "93.184.216.34", port: 443)) != .pass)

        #expect(tested.out(F.dnsFrame(F.dnsQuery(id: 3, "slow.example.com", type: 28))) == .pass)
        _ = tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 3, "slow.example.com", type: 28, records: [(nil, 28, 86400, F.address("2001:db8::80"))])))
        tested.clock.advance(seconds: 3599)
        #expect(tested.out(F.syn(to: "2001:db8::80", port: 443, from: F.guest6)) == .pass)
        tested.clock.advance(seconds: 2)
        #expect(tested.out(F.syn(to: "2001:db8::80", port: 443, from: F.guest6)) != .pass)  // 86400 s clamped to 3600
    }

    @Test func cnameTargetsAreLearnedAndStrangersAreNot() {
        let tested = FilterUnderTest(.allow(["www.example.com"]))
        #expect(tested.out(F.dnsFrame(F.dnsQuery(id: 9, "www.example.com"))) == .pass)
        _ = tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 9, "www.example.com", records: [
            ("edge.cdn.net", 1, 300, [198, 51, 100, 1]), (nil, 5, 300, F.dnsName("edge.cdn.net")), ("unrelated.org", 1, 300, [198, 51, 100, 2]),
        ])))
        #expect(tested.out(F.syn(to: "198.51.100.1", port: 443)) == .pass)
        #expect(tested.out(F.syn(to: "198.51.100.2", port: 443)) != .pass)
    }

    @Test func rebindingAnswersAreNotLearned() {
        let tested = FilterUnderTest(.allow(["rebind.example.com"], cidrs: ["192.0.2.0/24"]))
        #expect(tested.out(F.dnsFrame(F.dnsQuery(id: 5, "rebind.example.com"))) == .pass)
        let private4: [[UInt8]] = [[127, 0, 0, 1], [10, 1, 2, 3], [192, 168, 1, 1], [100, 64, 0, 1], [169, 254, 169, 254], [0, 0, 0, 0]]
        #expect(tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 5, "rebind.example.com", records: private4.map { (nil, 1, 300, $0) }))) == .pass)
        for address in ["127.0.0.1", "10.1.2.3", "192.168.1.1", "100.64.0.1", "169.254.169.254"] {
            #expect(tested.out(F.syn(to: address, port: 80)) != .pass, "\(address)")
        }
        #expect(tested.out(F.dnsFrame(F.dnsQuery(id: 6, "rebind.example.com", type: 28))) == .pass)
        _ = tested.in(F.dnsReplyFrame(F.dnsAnswer(id: 6, "rebind.example.com", type: 28, records: [
            (nil, 28, 300, F.address("fd00::1")), (nil, 28, 300, F.address("::1")), (nil, 28, 300, F.address("::ffff:127.0.0.1")),
            (nil, 28, 300, F.address("fe80::1")),
        ])))
        for address in ["fd00::1", "::1", "::ffff:127.0.0.1", "fe80::1"] {
            #expect(tested.out(F.syn(to: address, port: 80, from: F.guest6)) != .pass, "\(address)")
        }
        #expect(tested.log.all.contains("not allowing 127.0.0.1 for rebind.example.com: a special-purpose address in a DNS answer (rebinding); allow it with --allow-cidr"))
        // A CIDR that names a private range lets its answers be learned (and reached).
        let allowed = FilterUnderTest(.allow(["intranet.example.com"], cidrs: ["10.9.0.0/16"]))
        _ = allowed.out(F.dnsFrame(F.dnsQuery(id: 5, "intranet.example.com")))
        _ = allowed.in(F.dnsReplyFrame(F.dnsAnswer(id: 5, "intranet.example.com", records: [(nil, 1, 300, [10, 9, 0, 1])])))
        #expect(allowed.filter.state.withLock { $0.learned.value(.v4(0x0A09_0001), now: allowed.clock.now) } != nil)
    }

    @Test func publishedPortsLetTheGuestAnswerOnlyItsInboundFlows() {
        let tested = FilterUnderTest(.allow(published: ["8080:80", "5353:53/udp"]))
        let peer = "10.0.2.2"
        // The guest cannot start anything, not even from its published port.
        #expect(tested.out(F.ip(F.guest4, "192.0.2.9", 6, F.tcp(F.guest4, "192.0.2.9", 80, 443, flags: 0x02))) != .pass)
        #expect(tested.in(F.ip(peer, F.guest4, 6, F.tcp(peer, F.guest4, 50000, 80, flags: 0x02), outbound: false)) == .pass)
        #expect(tested.out(F.ip(F.guest4, peer, 6, F.tcp(F.guest4, peer, 80, 50000, flags: 0x12))) == .pass)
        #expect(tested.out(F.ip(F.guest4, peer, 6, F.tcp(F.guest4, peer, 80, 50001, flags: 0x12))) != .pass)
        #expect(tested.out(F.ip(F.guest4, "192.0.2.9", 6, F.tcp(F.guest4, "192.0.2.9", 80, 443, flags: 0x02))) != .pass)
        // A non-SYN segment to a published port starts nothing.
        #expect(tested.in(F.ip(peer, F.guest4, 6, F.tcp(peer, F.guest4, 50002, 80, flags: 0x10), outbound: false)) == .pass)
        #expect(tested.out(F.ip(F.guest4, peer, 6, F.tcp(F.guest4, peer, 80, 50002, flags: 0x10))) != .pass)
        // UDP: a datagram in, then the answer out.
        _ = tested.in(F.ip(peer, F.guest4, 17, F.udp(peer, F.guest4, 41000, 53, [1]), outbound: false))
        #expect(tested.out(F.ip(F.guest4, peer, 17, F.udp(F.guest4, peer, 53, 41000, [2]))) == .pass)
        // Flows end after an hour without traffic.
        tested.clock.advance(seconds: 3601)
        #expect(tested.out(F.ip(F.guest4, peer, 6, F.tcp(F.guest4, peer, 80, 50000, flags: 0x10))) != .pass)
    }

    @Test func fragmentsAreJudgedByAddress() {
        let tested = FilterUnderTest(.allow(cidrs: ["192.0.2.0/24"]))
        let allowed = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 17, [1, 2, 3, 4, 5, 6, 7, 8], fragment: 0x0010))
        let blocked = F.ethernet(0x0800, F.ipv4(F.guest4, "198.51.100.7", 17, [1, 2, 3, 4, 5, 6, 7, 8], fragment: 0x0010))
        let first = F.ethernet(0x0800, F.ipv4(F.guest4, "198.51.100.7", 17, F.udp(F.guest4, "198.51.100.7", 1, 9, [1]), fragment: 0x2000))
        let toResolver = F.ethernet(0x0800, F.ipv4(F.guest4, "10.0.2.3", 17, F.udp(F.guest4, "10.0.2.3", 1, 53, [1]), fragment: 0x2000))
        #expect(tested.out(allowed) == .pass)
        #expect(tested.out(blocked) == .drop && tested.out(first) == .drop && tested.out(toResolver) == .drop)
    }

    @Test func tablesStayBounded() {
        let tested = FilterUnderTest(.allow(["example.com"], published: ["8080:80"]))
        for i in 0..<(EgressFilter.tableCapacity + 100) {
            _ = tested.out(F.dnsFrame(F.dnsQuery(id: UInt16(i), "example.com")))
            _ = tested.in(F.ip("10.0.2.2", F.guest4, 6, F.tcp("10.0.2.2", F.guest4, UInt16(1000 + i), 80, flags: 0x02), outbound: false))
            _ = tested.out(F.syn(to: "198.51.\(i / 256).\(i % 256)", port: 443))
            tested.clock.value.withLock { $0 += 1 }
        }
        let counts = tested.filter.state.withLock { [$0.pending.count, $0.flows.count, $0.logged.count] }
        #expect(counts == [EgressFilter.tableCapacity, EgressFilter.tableCapacity, EgressFilter.tableCapacity])
        // The oldest went first: the newest flow still passes, the first does not.
        let newest = UInt16(1000 + EgressFilter.tableCapacity + 99)
        #expect(tested.out(F.ip(F.guest4, "10.0.2.2", 6, F.tcp(F.guest4, "10.0.2.2", 80, newest, flags: 0x12))) == .pass)
        #expect(tested.out(F.ip(F.guest4, "10.0.2.2", 6, F.tcp(F.guest4, "10.0.2.2", 80, 1000, flags: 0x12))) != .pass)
    }
}
