import Glibc
import SwiftletSystem
import Testing

/// `TCPEndpoint` parsing and `TCPSocket` over loopback.
@Suite struct TCPSocketTests {
    @Test func endpointsParseAndBadOnesSayWhy() throws {
        #expect(try TCPEndpoint(parsing: "127.0.0.1:7700") == TCPEndpoint(host: "127.0.0.1", port: 7700))
        #expect(try TCPEndpoint(parsing: "dest.example:80") == TCPEndpoint(host: "dest.example", port: 80))
        #expect(try TCPEndpoint(parsing: "[::1]:7700") == TCPEndpoint(host: "::1", port: 7700))
        #expect(TCPEndpoint(host: "::1", port: 7700).description == "[::1]:7700")
        for (text, says) in [("7700", "HOST:PORT"), (":7700", "names no host"), ("host:70000", "0 to 65535"), ("::1:80", "brackets"),
                             ("[::1]7700", "[IPV6]:PORT"), ("host:", "0 to 65535")] {
            do {
                _ = try TCPEndpoint(parsing: text)
                Issue.record("\(text) was accepted")
            } catch {
                #expect(error.message.contains(says), "\(text): \(error)")
            }
        }
    }

    @Test func aConnectionCarriesBytesAndABusyPortIsNamed() throws {
        let listener = try TCPSocket.listen(on: TCPEndpoint(host: "127.0.0.1", port: 0))
        let port = try TCPSocket.port(of: listener.rawValue)
        #expect(port > 0)
        let client = try TCPSocket.connect(to: TCPEndpoint(host: "127.0.0.1", port: port))
        guard let server = try TCPSocket.accept(listener.rawValue, deadline: MonotonicClock.now + 5_000_000_000) else {
            Issue.record("the connection was not accepted")
            return
        }
        try OwnedFileDescriptor.writeAll(fd: client.rawValue, Array("hello".utf8))
        var buffer = [UInt8](repeating: 0, count: 5)
        let n = try buffer.withMutableBytes { raw throws(SwiftletError) in try OwnedFileDescriptor.readSome(fd: server.rawValue, into: raw, what: "test") }
        #expect(n == 5 && buffer == Array("hello".utf8))
        // Nobody else waits: accept gives up at its deadline.
        let none = try TCPSocket.accept(listener.rawValue, deadline: MonotonicClock.now + 50_000_000)
        var accepted = true
        if case .none = consume none { accepted = false }
        #expect(!accepted)
        do {
            _ = try TCPSocket.listen(on: TCPEndpoint(host: "127.0.0.1", port: port))
            Issue.record("a second listener on one port")
        } catch {
            #expect(error.message.contains("in use"), "\(error)")
        }
        // A port nobody listens on: refused at once.
        let closed = try TCPSocket.listen(on: TCPEndpoint(host: "127.0.0.1", port: 0))
        let unused = try TCPSocket.port(of: closed.rawValue)
        _ = consume closed
        #expect(throws: SwiftletError.self) { _ = try TCPSocket.connect(to: TCPEndpoint(host: "127.0.0.1", port: unused), timeoutMilliseconds: 2000) }
    }
}
