import FoundationEssentials
import SwiftletSystem
import Testing
@testable import SwiftletNet

@Suite struct PolicyValueTests {
    /// The message of the SwiftletError `body` throws (nil when it throws none).
    func message(_ body: () throws -> Void) -> String? {
        do { try body(); return nil } catch let error as SwiftletError {
            return error.code == .invalidArgument ? error.message : "wrong code \(error.code)"
        } catch { return "not a SwiftletError: \(error)" }
    }

    @Test func macAddressesParseAndPrint() throws {
        let mac = try MACAddress(parsing: "02:53:57:0A:00:01")
        #expect(mac.bytes == [2, 0x53, 0x57, 0x0A, 0, 1])
        #expect(mac.description == "02:53:57:0a:00:01")
        #expect(GuestNetwork.default.guestMAC.description == "02:53:57:00:00:01")
        for bad in ["", "02:53:57:00:00", "02:53:57:00:00:01:02", "02:53:57:00:00:1", "zz:53:57:00:00:01", "02-53-57-00-00-01"] {
            #expect(message { _ = try MACAddress(parsing: bad) }?.contains("'\(bad)' is not a MAC address (six hex bytes like 02:53:57:00:00:01)") == true)
        }
        #expect(message { _ = try MACAddress([1, 2, 3]) } == "a MAC address has 6 bytes, not 3")
    }

    @Test(arguments: [
        ("10.0.2.15", "10.0.2.15"), ("0.0.0.0", "0.0.0.0"), ("255.255.255.255", "255.255.255.255"),
        ("::", "::"), ("::1", "::1"), ("2001:db8::1", "2001:db8::1"), ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"), ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),  // first of equal runs
        ("2001:db8:1:2:3:4:5:0", "2001:db8:1:2:3:4:5:0"),  // a single zero group is not compressed
        ("fe80::", "fe80::"), ("1:0:0:0:0:0:0:0", "1::"), ("::ffff:192.0.2.1", "::ffff:c000:201"),
        ("fd00:ec2::254", "fd00:ec2::254"), ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
    ])
    func ipAddressesParseAndPrint(_ text: String, _ printed: String) throws {
        let address = try IPAddress(parsing: text)
        #expect(address.description == printed)
        #expect(try IPAddress(parsing: printed) == address)
        #expect(IPAddress(bytes: address.bytes) == address)
    }

    @Test func badIPAddressesAreRejectedWithTheirText() {
        for bad in ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-4", "a.b.c.d", ":::", "1::2::3", "1:2:3:4:5:6:7:8:9",
                    "12345::", "1:2:3:4:5:6:7::8", "::g", "fe80::1%eth0", "[::1]", " 1.2.3.4", "1:2:3:4:5:6:7",
                    "1.2.3.4::", "1.2.3.4::1", "::1.2.3.4:1", "::1.2.3", "1:2:3:4:5:6:7:1.2.3.4"] {
            #expect(message { _ = try IPAddress(parsing: bad) }
                    == "'\(bad)' is not an IP address (IPv4 like 192.0.2.1, or IPv6 like 2001:db8::1)", "\(bad)")
        }
    }

    @Test func cidrsParseCheckTheirPrefixAndContain() throws {
        let ten = try CIDR(parsing: "10.0.0.0/8")
        #expect(ten.contains(try IPAddress(parsing: "10.255.1.2")))
        #expect(!ten.contains(try IPAddress(parsing: "11.0.0.1")))
        #expect(!ten.contains(try IPAddress(parsing: "::ffff:10.0.0.1")))
        #expect(try CIDR(parsing: "0.0.0.0/0").contains(try IPAddress(parsing: "203.0.113.9")))
        #expect(try CIDR(parsing: "1.2.3.4").description == "1.2.3.4/32")
        #expect(try CIDR(parsing: "2001:db8::/32").contains(try IPAddress(parsing: "2001:db8:ffff::1")))
        #expect(!(try CIDR(parsing: "2001:db8::/32")).contains(try IPAddress(parsing: "2001:db9::1")))
        #expect(try CIDR(parsing: "2001:db8::1/128").contains(try IPAddress(parsing: "2001:db8::1")))
        #expect(try CIDR(parsing: "::/0").contains(try IPAddress(parsing: "::1")))
        #expect(try CIDR(parsing: "2001:db8:0:0:8000::/65").contains(try IPAddress(parsing: "2001:db8::8000:0:0:1")))
        #expect(message { _ = try CIDR(parsing: "10.0.0.1/8") } == "'10.0.0.1/8' has bits set past its /8 prefix: did you mean 10.0.0.0/8?")
        #expect(message { _ = try CIDR(parsing: "2001:db8::1/32") } == "'2001:db8::1/32' has bits set past its /32 prefix: did you mean 2001:db8::/32?")
        #expect(message { _ = try CIDR(parsing: "10.0.0.0/33") } == "'10.0.0.0/33': the prefix length after '/' must be a number from 0 to 32")
        #expect(message { _ = try CIDR(parsing: "::/129") } == "'::/129': the prefix length after '/' must be a number from 0 to 128")
        #expect(message { _ = try CIDR(parsing: "10.0.0.0/") }?.contains("must be a number from 0 to 32") == true)
        #expect(message { _ = try CIDR(parsing: "10.0.0.0/-1") }?.contains("must be a number") == true)
        #expect(message { _ = try CIDR(parsing: "example.com/8") } == "'example.com/8' is not an address range (like 192.0.2.0/24 or 2001:db8::/32)")
        #expect(message { _ = try CIDR(parsing: "1.2.3.0/24/1") }?.contains("is not an address range") == true)
    }

    @Test func hostPatternsMatchDotBoundedSuffixes() throws {
        let wildcard = try HostPattern(parsing: "*.Example.COM.")
        #expect(wildcard.description == "*.example.com")
        #expect(wildcard.matches("a.example.com"))
        #expect(wildcard.matches("a.b.example.com"))
        #expect(!wildcard.matches("example.com"))
        #expect(!wildcard.matches("badexample.com"))
        #expect(!wildcard.matches(".example.com"))
        let exact = try HostPattern(parsing: "PyPI.org")
        #expect(exact.matches("pypi.org") && !exact.matches("www.pypi.org") && !exact.matches("pypi.org.evil"))
        let long = String(repeating: "a", count: 63)
        #expect(try HostPattern(parsing: [long, long, long, String(repeating: "b", count: 61)].joined(separator: ".")).name.count == 253)
    }

    @Test func badHostPatternsSayWhatIsWrong() {
        let use = "use a host name like api.example.com, or *.example.com for every name under example.com"
        let cases: [(String, String)] = [
            ("", "empty name"), ("a..b", "empty label"), ("*", "'*' may only be the whole first label"),
            ("a.*.com", "'*' may only be the whole first label"), ("*a.com", "'*a' has characters other than letters, digits and '-'"),
            ("a_b.com", "'a_b' has characters other than letters, digits and '-'"), ("-a.com", "'-a' starts or ends with '-'"),
            ("a-.com", "'a-' starts or ends with '-'"), (String(repeating: "a", count: 64) + ".com", "a label is longer than 63 characters"),
            ([String](repeating: String(repeating: "a", count: 63), count: 4).joined(separator: "."), "longer than 253 characters"),
            ("exämple.com", "'exämple' has characters other than letters, digits and '-'"),
        ]
        for (text, problem) in cases {
            #expect(message { _ = try HostPattern(parsing: text) } == "'\(text)' is not a valid host pattern (\(problem)): \(use)", "\(text)")
        }
        #expect(message { _ = try HostPattern(parsing: "192.0.2.1") } == "'192.0.2.1' is an address, not a host name: allow it with --allow-cidr")
    }

    @Test func portPublicationsParse() throws {
        let plain = try PortPublication(parsing: "8080:80")
        #expect(plain == PortPublication(hostPort: 8080, guestPort: 80))
        #expect(plain.description == "127.0.0.1:8080:80/tcp")
        #expect(try PortPublication(parsing: "0.0.0.0:53:5353/udp").description == "0.0.0.0:53:5353/udp")
        let v6 = try PortPublication(parsing: "[::1]:8080:80/TCP")
        #expect(v6.hostAddress == .v6(0, 1) && v6.hostPort == 8080 && v6.guestPort == 80)
        #expect(v6.description == "[::1]:8080:80/tcp")
        #expect(try PortPublication(parsing: "65535:1").hostPort == 65535)
    }

    @Test func badPortPublicationsSayWhatIsWrong() {
        let usage = "use [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80 or 0.0.0.0:8080:80/tcp or [::1]:8080:80"
        #expect(message { _ = try PortPublication(parsing: "8080") } == "'8080' is not a port publication (\(usage); an IPv6 host address goes in brackets)")
        #expect(message { _ = try PortPublication(parsing: "::1:8080:80") }?.contains("an IPv6 host address goes in brackets") == true)
        #expect(message { _ = try PortPublication(parsing: "0:80") } == "'0:80': the host port '0' must be a number from 1 to 65535")
        #expect(message { _ = try PortPublication(parsing: "80:65536") } == "'80:65536': the guest port '65536' must be a number from 1 to 65535")
        #expect(message { _ = try PortPublication(parsing: "80:+8") } == "'80:+8': the guest port '+8' must be a number from 1 to 65535")
        #expect(message { _ = try PortPublication(parsing: "8080:80/sctp") } == "'8080:80/sctp': the protocol after '/' must be tcp or udp")
        #expect(message { _ = try PortPublication(parsing: "localhost:8080:80") } == "'localhost:8080:80': 'localhost' is not a host IP address (\(usage))")
        #expect(message { _ = try PortPublication(parsing: "[::1]8080:80") }?.contains("must be followed by ':'") == true)
        #expect(message { _ = try PortPublication(parsing: "[::1]:1:8080:80") }?.contains("is not a port publication") == true)
    }

    @Test func configurationsEncodeWithStableKeysAndSummarise() throws {
        let configuration = NetworkConfiguration.allow(["*.example.com"], cidrs: ["10.0.0.0/8"], published: ["8080:80"])
        let json = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        for key in ["\"allowAll\":false", "\"allowedHosts\":[\"*.example.com\"]", "\"allowedCIDRs\":[\"10.0.0.0\\/8\"]",
                    "\"hostAddress\":\"127.0.0.1\"", "\"hostPort\":8080", "\"guestPort\":80", "\"transport\":\"tcp\""] {
            #expect(json.contains(key), "\(json)")
        }
        #expect(try JSONDecoder().decode(NetworkConfiguration.self, from: Data(json.utf8)) == configuration)
        #expect(try JSONDecoder().decode(NetworkConfiguration.self, from: Data("{\"allowAll\":true}".utf8)) == NetworkConfiguration(allowAll: true))
        #expect(throws: (any Error).self) { try JSONDecoder().decode(NetworkConfiguration.self, from: Data("{\"allowedCIDRs\":[\"10.0.0.1/8\"]}".utf8)) }
        #expect(configuration.summary == "allow *.example.com, 10.0.0.0/8; ports 127.0.0.1:8080:80/tcp")
        #expect(NetworkConfiguration().summary == "none" && !NetworkConfiguration().hasNetwork)
        #expect(NetworkConfiguration(allowAll: true).summary == "open" && NetworkConfiguration(allowAll: true).isOpen)
        #expect(NetworkConfiguration.allow(published: ["1:2/udp"]).summary == "inbound only; ports 127.0.0.1:1:2/udp")
        var both = NetworkConfiguration.allow(["a.com"])
        both.allowAll = true
        #expect(!both.isOpen && both.isAllowList)
    }
}
