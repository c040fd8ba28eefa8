import Testing
@testable import SwiftletNet

@Suite struct FrameParsingTests {
    typealias F = TestFrames

    func ipPacket(_ frame: [UInt8]) -> IPPacket? {
        frame.withUnsafeBytes { buffer in
            guard let ethernet = EthernetFrame(buffer), let ip = IPPacket(ethernet.payload, ipv6: ethernet.etherType == 0x86DD) else { return nil }
            return ip
        }
    }

    @Test func ethernetAndARPParse() {
        let frame = F.arp(operation: 2)
        frame.withUnsafeBytes { buffer in
            let ethernet = EthernetFrame(buffer)
            #expect(ethernet?.etherType == 0x0806)
            #expect(Array(ethernet!.source) == F.guestMAC)
            let arp = ARPPacket(ethernet!.payload)
            #expect(arp?.operation == 2 && arp?.senderAddress == .v4(0x0A00_020F) && arp?.targetAddress == .v4(0x0A00_0202))
        }
        var wrong = frame
        wrong[14 + 5] = 16  // protocol address length
        wrong.withUnsafeBytes { #expect(ARPPacket(EthernetFrame($0)!.payload) == nil) }
    }

    @Test func ipv4WithOptionsAndPaddingParses() {
        var frame = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 6, F.tcp(F.guest4, "192.0.2.7", 1, 2, flags: 2), options: [1, 1, 1, 0]))
        frame += [0, 0, 0, 0]  // Ethernet padding past the IP total length
        frame.withUnsafeBytes { buffer in
            let ip = IPPacket(EthernetFrame(buffer)!.payload, ipv6: false)
            #expect(ip?.headerLength == 24 && ip?.transport == 6 && ip?.payload.count == 20 && ip?.bytes.count == 44)
            #expect(ip?.destination == .v4(0xC000_0207) && ip?.isFragment == false)
            let tcp = TCPSegment(ip!.payload)
            #expect(tcp?.sourcePort == 1 && tcp?.destinationPort == 2 && tcp?.isInitialSYN == true && tcp?.sequence == 1000)
        }
    }

    @Test func ipv4FragmentsAreMarked() {
        let first = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 17, F.udp(F.guest4, "192.0.2.7", 1, 2, [1]), fragment: 0x2000))
        let later = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 17, [1, 2, 3, 4, 5, 6, 7, 8], fragment: 0x0003))
        #expect(ipPacket(first)?.isFragment == true && ipPacket(first)?.isLaterFragment == false)
        #expect(ipPacket(later)?.isFragment == true && ipPacket(later)?.isLaterFragment == true)
    }

    @Test func ipv6ExtensionHeadersAreWalkedWithABound() {
        let udp = F.udp(F.guest6, "2001:db8::9", 1, 53, [7])
        let options: [UInt8] = [1, 4, 0, 0, 0, 0]  // PadN filling the 8 bytes
        let chained = F.ethernet(0x86DD, F.ipv6(F.guest6, "2001:db8::9", 17, udp, extensions: [(0, options), (60, options), (43, [0, 0, 0, 0, 0, 0])]))
        let ip = ipPacket(chained)
        #expect(ip?.transport == 17 && ip?.headerLength == 64 && ip?.payload.count == udp.count)
        let fragment = F.ethernet(0x86DD, F.ipv6(F.guest6, "2001:db8::9", 17, [1, 2, 3, 4, 5, 6, 7, 8], extensions: [(44, [0, 0x18, 0, 0, 0, 1])]))
        #expect(ipPacket(fragment)?.isLaterFragment == true)
        let tooLong = F.ethernet(0x86DD, F.ipv6(F.guest6, "2001:db8::9", 17, udp, extensions: Array(repeating: (UInt8(60), options), count: 9)))
        #expect(ipPacket(tooLong) == nil)
        let lateHopByHop = F.ethernet(0x86DD, F.ipv6(F.guest6, "2001:db8::9", 17, udp, extensions: [(60, options), (0, options)]))
        #expect(ipPacket(lateHopByHop) == nil)
    }

    @Test func headersWithLyingLengthsAreMalformed() {
        var badTotal = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 17, F.udp(F.guest4, "192.0.2.7", 1, 2, [1])))
        badTotal[14 + 3] &+= 1
        #expect(ipPacket(badTotal) == nil)
        var badIHL = F.ethernet(0x0800, F.ipv4(F.guest4, "192.0.2.7", 17, []))
        badIHL[14] = 0x44
        #expect(ipPacket(badIHL) == nil)
        var badUDP = F.udp(F.guest4, "192.0.2.7", 1, 2, [1])
        badUDP[5] = 7
        badUDP.withUnsafeBytes { #expect(UDPDatagram($0) == nil) }
        var badTCP = F.tcp(F.guest4, "192.0.2.7", 1, 2, flags: 2)
        badTCP[12] = 0xF0
        badTCP.withUnsafeBytes { #expect(TCPSegment($0) == nil) }
        badTCP[12] = 0x40
        badTCP.withUnsafeBytes { #expect(TCPSegment($0) == nil) }
    }

    /// Every prefix of a valid frame of each kind: the parsers and the filter never trap, and a
    /// frame cut inside its headers is dropped.
    @Test func everyTruncationIsSafe() {
        let frames: [[UInt8]] = [
            F.arp(), F.syn(to: "192.0.2.7", port: 443), F.syn(to: "2001:db8::7", port: 443, from: F.guest6),
            F.udpFrame(to: "192.0.2.7", port: 9), F.udpFrame(to: "2001:db8::7", port: 9, from: F.guest6),
            F.ping(to: "192.0.2.7"), F.ping(to: "2001:db8::7", from: F.guest6),
            F.dnsFrame(F.dnsQuery("example.com")), F.dnsFrame(F.dnsQuery("denied.org")),
            F.dnsReplyFrame(F.dnsAnswer("example.com", records: [(nil, 1, 300, [93, 184, 216, 34])])),
        ]
        let filters = [FilterUnderTest(.allow(["example.com"], published: ["8080:80"])), FilterUnderTest(NetworkConfiguration(allowAll: true))]
        for frame in frames {
            for length in 0..<frame.count {
                let prefix = Array(frame[0..<length])
                for tested in filters {
                    #expect(tested.out(prefix) == .drop, "outbound \(length)/\(frame.count)")
                    #expect(tested.in(prefix) == .drop, "inbound \(length)/\(frame.count)")
                }
            }
        }
    }

    @Test func dnsMessagesParseWithCompression() {
        let answer = F.dnsAnswer("www.Example.com", records: [
            (nil, 5, 300, F.dnsName("cdn.example.net")), ("cdn.example.net", 1, 20, [192, 0, 2, 1]),
            ("cdn.example.net", 28, 7200, F.address("2001:db8::1")), ("other.example.org", 1, 20, [192, 0, 2, 99]),
        ])
        answer.withUnsafeBytes { buffer in
            guard let message = DNSMessage(buffer) else { Issue.record("no message"); return }
            #expect(message.id == 0x1234 && message.isResponse && message.questions.count == 1 && message.answers.count == 4)
            #expect(message.questions[0].name.text == "www.example.com")
            let addresses = message.addresses(answering: message.questions[0].name)
            #expect(addresses.map(\.0) == [.v4(0xC000_0201), try! IPAddress(parsing: "2001:db8::1")])
            #expect(addresses.map(\.1) == [20, 7200])
        }
    }

    @Test func dnsCompressionLoopsAndLyingCountsAreMalformed() {
        // A name that points at itself.
        var looping = F.be16(1) + [0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0] + [0xC0, 12] + [0, 1, 0, 1]
        looping.withUnsafeBytes { #expect(DNSMessage($0) == nil) }
        // Two pointers at each other.
        looping = F.be16(1) + [0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0] + [0xC0, 14, 0xC0, 12] + [0, 1, 0, 1]
        looping.withUnsafeBytes { #expect(DNSMessage($0) == nil) }
        // A count of 65535 answers with no bytes for them.
        var lying = F.dnsQuery("a.com")
        lying[6] = 0xFF; lying[7] = 0xFF
        lying.withUnsafeBytes { #expect(DNSMessage($0) == nil) }
        lying.withUnsafeBytes { #expect(DNSMessage($0, readAnswers: false)?.questions.count == 1) }
        // A name longer than 255 bytes through pointers to a 63-byte label chain.
        let label = [UInt8(63)] + [UInt8](repeating: 0x61, count: 63)
        var long = F.be16(1) + [0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0] + label + label + label + label + [0] + [0, 1, 0, 1]
        long.withUnsafeBytes { #expect(DNSMessage($0) == nil) }
        // An A record of 5 bytes, a record overrunning the message.
        let bad = F.dnsAnswer("a.com", records: [(nil, 1, 60, [1, 2, 3, 4, 5])])
        bad.withUnsafeBytes { #expect(DNSMessage($0) == nil) }
        long = F.dnsAnswer("a.com", records: [(nil, 1, 60, [1, 2, 3, 4])])
        for length in 0..<long.count { Array(long[0..<length]).withUnsafeBytes { #expect(DNSMessage($0) == nil) } }
    }

    @Test func dnsRepliesEchoTheQuery() {
        let query = F.dnsQuery(id: 0xBEEF, "Host.Swiftlet.Internal", type: 1)
        query.withUnsafeBytes { buffer in
            let message = DNSMessage(buffer, readAnswers: false)!
            let reply = DNSMessage.reply(to: message, responseCode: 3)
            #expect(Array(reply[0..<4]) == [0xBE, 0xEF, 0x81, 0x83])
            #expect(Array(reply[12...]) == Array(query[12...]))
            let answer = DNSMessage.reply(to: message, responseCode: 0, answers: [DNSMessage.addressRecord(.v4(0x0A00_0202), ttl: 600)])
            answer.withUnsafeBytes { parsed in
                let back = DNSMessage(parsed)
                #expect(back?.answers == [DNSRecord(name: message.questions[0].name, type: 1, ttl: 600, data: .address(.v4(0x0A00_0202)))])
            }
        }
    }

    @Test func expiringTablesDropExpiredThenOldestWhenFull() {
        var table = ExpiringTable<Int, String>(capacity: 3)
        table.insert(1, "a", expiry: 10, now: 0)
        table.insert(2, "b", expiry: 30, now: 0)
        table.insert(3, "c", expiry: 20, now: 0)
        table.insert(4, "d", expiry: 40, now: 0)  // full: 1 expires first and goes
        #expect(table.count == 3 && table.value(1, now: 0) == nil && table.value(4, now: 0) == "d")
        #expect(table.value(3, now: 19) == "c" && table.value(3, now: 20) == nil)
        let extended = table.extend(2, to: 50, now: 0)
        #expect(extended && table.value(2, now: 45) == "b")
        let revived = table.extend(3, to: 90, now: 25)
        #expect(!revived)  // expired entries are not revived
        table.insert(5, "e", expiry: 60, now: 25)  // full: the expired 3 goes, nothing live
        #expect(table.count == 3 && table.value(2, now: 25) == "b" && table.value(4, now: 25) == "d")
    }

    @Test func checksumsMatchAnIndependentRoutine() {
        var random = SystemRandomNumberGenerator()
        for length in [0, 1, 2, 3, 20, 21, 1499] {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
            var checksum = InternetChecksum()
            checksum.add(Array(bytes.prefix(length / 3)))  // in parts, an odd split included
            checksum.add(Array(bytes.dropFirst(length / 3)))
            #expect(checksum.value == F.checksum(bytes))
        }
    }
}
