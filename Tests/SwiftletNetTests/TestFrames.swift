import Synchronization
@testable import SwiftletNet

/// Frames built byte by byte, independently of SwiftletNet's builders, and an independent
/// checksum check for the frames the filter makes.
enum TestFrames {
    static let guestMAC: [UInt8] = [0x02, 0x53, 0x57, 0, 0, 0x01]
    static let gatewayMAC: [UInt8] = [0x02, 0x53, 0x57, 0, 0, 0x02]
    static let guest4 = "10.0.2.15", guest6 = "2001:db8:1::15"

    static func address(_ text: String) -> [UInt8] { try! IPAddress(parsing: text).bytes }
    static func be16(_ v: Int) -> [UInt8] { [UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }

    /// RFC 1071, written the plain way: 32-bit sum of 16-bit words, carries folded, complemented.
    static func checksum(_ bytes: [UInt8]) -> UInt16 {
        var sum: UInt32 = 0
        var i = 0
        while i + 1 < bytes.count { sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1]); i += 2 }
        if i < bytes.count { sum += UInt32(bytes[i]) << 8 }
        while sum > 0xFFFF { sum = (sum & 0xFFFF) + (sum >> 16) }
        return ~UInt16(sum)
    }

    static func pseudo(_ src: [UInt8], _ dst: [UInt8], _ proto: UInt8, _ length: Int) -> [UInt8] {
        src.count == 4 ? src + dst + [0, proto] + be16(length) : src + dst + be32(UInt32(length)) + [0, 0, 0, proto]
    }

    static func ethernet(_ type: UInt16, _ payload: [UInt8], outbound: Bool = true) -> [UInt8] {
        (outbound ? gatewayMAC + guestMAC : guestMAC + gatewayMAC) + be16(Int(type)) + payload
    }

    static func ipv4(_ src: String, _ dst: String, _ proto: UInt8, _ payload: [UInt8], fragment: UInt16 = 0, options: [UInt8] = []) -> [UInt8] {
        var header: [UInt8] = [0x40 | UInt8(5 + options.count / 4), 0] + be16(20 + options.count + payload.count)
            + [0x12, 0x34] + be16(Int(fragment)) + [64, proto, 0, 0] + address(src) + address(dst) + options
        let sum = checksum(header)
        header[10] = UInt8(sum >> 8); header[11] = UInt8(sum & 0xFF)
        return header + payload
    }

    /// `extensions`: (next-header value of the extension, its body after the 2 first bytes, padded by the caller).
    static func ipv6(_ src: String, _ dst: String, _ proto: UInt8, _ payload: [UInt8], hopLimit: UInt8 = 64,
                     extensions: [(UInt8, [UInt8])] = []) -> [UInt8] {
        var chain: [UInt8] = []
        let types = extensions.map(\.0) + [proto]
        for (i, ext) in extensions.enumerated() {
            if ext.0 == 44 { chain += [types[i + 1], 0] + ext.1 } else { chain += [types[i + 1], UInt8((ext.1.count + 2) / 8 - 1)] + ext.1 }
        }
        return [0x60, 0, 0, 0] + be16(chain.count + payload.count) + [types[0], hopLimit] + address(src) + address(dst) + chain + payload
    }

    static func tcp(_ src: String, _ dst: String, _ sport: UInt16, _ dport: UInt16, flags: UInt8, seq: UInt32 = 1000,
                    ack: UInt32 = 0, data: [UInt8] = []) -> [UInt8] {
        var segment = be16(Int(sport)) + be16(Int(dport)) + be32(seq) + be32(ack) + [0x50, flags] + be16(64240) + [0, 0, 0, 0] + data
        let sum = checksum(pseudo(address(src), address(dst), 6, segment.count) + segment)
        segment[16] = UInt8(sum >> 8); segment[17] = UInt8(sum & 0xFF)
        return segment
    }

    static func udp(_ src: String, _ dst: String, _ sport: UInt16, _ dport: UInt16, _ data: [UInt8]) -> [UInt8] {
        var datagram = be16(Int(sport)) + be16(Int(dport)) + be16(8 + data.count) + [0, 0] + data
        let sum = checksum(pseudo(address(src), address(dst), 17, datagram.count) + datagram)
        datagram[6] = UInt8(sum >> 8); datagram[7] = UInt8(sum & 0xFF)
        return datagram
    }

    static func icmp(_ type: UInt8, _ code: UInt8, _ rest: [UInt8], v6: (String, String)? = nil) -> [UInt8] {
        var message = [type, code, 0, 0] + rest
        let sum = v6.map { checksum(pseudo(address($0.0), address($0.1), 58, message.count) + message) } ?? checksum(message)
        message[2] = UInt8(sum >> 8); message[3] = UInt8(sum & 0xFF)
        return message
    }

    /// A whole frame from the guest (or to it, `outbound: false`) over IPv4 or IPv6 (by `src`'s form).
    static func ip(_ src: String, _ dst: String, _ proto: UInt8, _ payload: [UInt8], outbound: Bool = true) -> [UInt8] {
        src.contains(":") ? ethernet(0x86DD, ipv6(src, dst, proto, payload), outbound: outbound)
            : ethernet(0x0800, ipv4(src, dst, proto, payload), outbound: outbound)
    }

    static func syn(to dst: String, port: UInt16, from src: String = guest4, sport: UInt16 = 40000) -> [UInt8] {
        ip(src, dst, 6, tcp(src, dst, sport, port, flags: 0x02))
    }

    static func udpFrame(to dst: String, port: UInt16, from src: String = guest4, sport: UInt16 = 40001, data: [UInt8] = [1, 2, 3]) -> [UInt8] {
        ip(src, dst, 17, udp(src, dst, sport, port, data))
    }

    static func ping(to dst: String, from src: String = guest4) -> [UInt8] {
        src.contains(":") ? ip(src, dst, 58, icmp(128, 0, [0, 1, 0, 1, 9, 9], v6: (src, dst)))
            : ip(src, dst, 1, icmp(8, 0, [0, 1, 0, 1, 9, 9]))
    }

    static func arp(operation: UInt16 = 1) -> [UInt8] {
        ethernet(0x0806, [0, 1, 8, 0, 6, 4] + be16(Int(operation)) + guestMAC + address(guest4) + [0, 0, 0, 0, 0, 0] + address("10.0.2.2"))
    }

    static func dnsName(_ name: String) -> [UInt8] {
        name.split(separator: ".").flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } + [0]
    }

    static func dnsQuery(id: UInt16 = 0x1234, _ name: String, type: UInt16 = 1) -> [UInt8] {
        be16(Int(id)) + [0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0] + dnsName(name) + be16(Int(type)) + [0, 1]
    }

    /// An answer whose records name the question by a compression pointer (owner nil) or by name.
    static func dnsAnswer(id: UInt16 = 0x1234, _ name: String, type: UInt16 = 1,
                          records: [(owner: String?, type: UInt16, ttl: UInt32, data: [UInt8])]) -> [UInt8] {
        var message = be16(Int(id)) + [0x81, 0x80, 0, 1] + be16(records.count) + [0, 0, 0, 0] + dnsName(name) + be16(Int(type)) + [0, 1]
        for record in records {
            message += (record.owner.map(dnsName) ?? [0xC0, 12]) + be16(Int(record.type)) + [0, 1] + be32(record.ttl)
                + be16(record.data.count) + record.data
        }
        return message
    }

    static func dnsFrame(_ message: [UInt8], from src: String = guest4, to dst: String = "10.0.2.3", sport: UInt16 = 33333) -> [UInt8] {
        ip(src, dst, 17, udp(src, dst, sport, 53, message))
    }

    static func dnsReplyFrame(_ message: [UInt8], to dst: String = guest4, from src: String = "10.0.2.3", dport: UInt16 = 33333) -> [UInt8] {
        ip(src, dst, 17, udp(src, dst, 53, dport, message), outbound: false)
    }

    /// Checks a frame the filter made: Ethernet addresses toward the guest, IPv4 header checksum,
    /// the transport checksum (with its pseudo-header; ICMPv4 without). Returns the IP payload.
    static func verifiedPayload(_ frame: [UInt8]) -> (proto: UInt8, src: [UInt8], dst: [UInt8], payload: [UInt8])? {
        guard frame.count >= 14, Array(frame[0..<6]) == guestMAC, Array(frame[6..<12]) == gatewayMAC else { return nil }
        let ip = Array(frame[14...])
        let proto: UInt8, src: [UInt8], dst: [UInt8], payload: [UInt8]
        if frame[12] == 0x08 && frame[13] == 0 {
            guard ip.count >= 20, ip[0] == 0x45, checksum(Array(ip[0..<20])) == 0,
                  Int(ip[2]) << 8 | Int(ip[3]) == ip.count else { return nil }
            (proto, src, dst, payload) = (ip[9], Array(ip[12..<16]), Array(ip[16..<20]), Array(ip[20...]))
        } else if frame[12] == 0x86 && frame[13] == 0xDD {
            guard ip.count >= 40, ip[0] >> 4 == 6, Int(ip[4]) << 8 | Int(ip[5]) == ip.count - 40 else { return nil }
            (proto, src, dst, payload) = (ip[6], Array(ip[8..<24]), Array(ip[24..<40]), Array(ip[40...]))
        } else {
            return nil
        }
        let covered = proto == 1 ? payload : pseudo(src, dst, proto, payload.count) + payload
        guard checksum(covered) == 0 else { return nil }
        return (proto, src, dst, payload)
    }
}

/// A clock the tests move by hand (nanoseconds).
final class FakeClock: Sendable {
    let value = Mutex<UInt64>(1_000_000_000_000)
    var now: UInt64 { value.withLock { $0 } }
    func advance(seconds: UInt64) { value.withLock { $0 += seconds * 1_000_000_000 } }
}

/// The log lines a filter wrote.
final class LogLines: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    func append(_ line: String) { lines.withLock { $0.append(line) } }
}

/// A filter with a fake clock and a collected log.
struct FilterUnderTest {
    let filter: EgressFilter
    let clock = FakeClock()
    let log = LogLines()

    init(_ configuration: NetworkConfiguration) {
        let clock = clock, log = log
        filter = EgressFilter(configuration: configuration, clock: { clock.now }, log: { log.append($0) })
    }

    func out(_ frame: [UInt8]) -> FilterVerdict { frame.withUnsafeBytes { filter.outbound($0) } }
    func `in`(_ frame: [UInt8]) -> FilterVerdict { frame.withUnsafeBytes { filter.inbound($0) } }

    /// The one frame of a `.reply` verdict, checked by `TestFrames.verifiedPayload`.
    func reply(_ frame: [UInt8]) -> (proto: UInt8, src: [UInt8], dst: [UInt8], payload: [UInt8])? {
        guard case .reply(let frames) = out(frame), frames.count == 1 else { return nil }
        return TestFrames.verifiedPayload(frames[0])
    }
}

extension NetworkConfiguration {
    static func allow(_ hosts: [String] = [], cidrs: [String] = [], published: [String] = []) -> NetworkConfiguration {
        NetworkConfiguration(allowAll: false, allowedHosts: hosts.map { try! HostPattern(parsing: $0) },
                             allowedCIDRs: cidrs.map { try! CIDR(parsing: $0) }, published: published.map { try! PortPublication(parsing: $0) })
    }
}
