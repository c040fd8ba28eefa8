import Glibc
import Synchronization
import SwiftletDigest
import SwiftletSystem
import Testing
@testable import MachineState

/// The migration stream's handshake and message authentication, over a socket pair: the
/// destination on a helper thread, the source on the test's.
@Suite struct MigrationChannelTests {
    /// Runs `destination` on a thread with one end of a socket pair and `source` here with the
    /// other; returns what each threw (nil: it did not).
    func pair(destination: @escaping @Sendable (Int32) throws(SwiftletError) -> Void,
              source: (Int32) throws(SwiftletError) -> Void) throws -> (destination: SwiftletError?, source: SwiftletError?) {
        let sockets = try UnixSocket.pair()
        let far = sockets.second.rawValue
        let failure = Mutex<SwiftletError?>(nil)
        let thread = try OSThread.start(name: "destination") {
            do throws(SwiftletError) { try destination(far) } catch { failure.withLock { $0 = error } }
            UnixSocket.shutdown(far, .both)
        }
        var sourceFailure: SwiftletError?
        do throws(SwiftletError) { try source(sockets.first.rawValue) } catch { sourceFailure = error }
        UnixSocket.shutdown(sockets.first.rawValue, .both)
        thread.join()
        return (failure.withLock { $0 }, sourceFailure)
    }

    @Test func bothSidesHoldingTheTokenExchangeMessagesBothWays() throws {
        let token = try MigrationChannel.newToken()
        let got = Mutex<[UInt8]>([])
        let result = try pair(destination: { fd throws(SwiftletError) in
            let channel = try MigrationChannel.accept(fd, token: token, timeoutMilliseconds: 5000)
            let payload = try channel.receive(.layout)
            got.withLock { $0 = payload }
            try channel.send(.ready)
        }, source: { fd throws(SwiftletError) in
            let channel = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 5000)
            let page = [UInt8](repeating: 7, count: 8192)
            try page.withBytes { raw throws(SwiftletError) in try channel.send(.layout, [1, 2, 3], body: raw) }
            _ = try channel.receive(.ready)
        })
        #expect(result.destination == nil && result.source == nil, "\(String(describing: result))")
        #expect(got.withLock { $0 } == [1, 2, 3] + [UInt8](repeating: 7, count: 8192))
    }

    @Test func aWrongTokenIsRefusedAndGetsNothing() throws {
        let token = try MigrationChannel.newToken(), other = try MigrationChannel.newToken()
        let result = try pair(destination: { fd throws(SwiftletError) in
            let channel = try MigrationChannel.accept(fd, token: token, timeoutMilliseconds: 5000)
            try channel.send(.ready)
        }, source: { fd throws(SwiftletError) in
            _ = try MigrationChannel.connect(fd, token: other, timeoutMilliseconds: 5000)
        })
        #expect(result.destination?.code == .permissionDenied)
        #expect(result.destination?.description.contains("does not hold the token") == true)
        // The destination sent nothing after its hello: the source saw the stream end, and says what it means.
        #expect(result.source?.code == .permissionDenied, "\(String(describing: result.source))")
        #expect(result.source?.description.contains("the token is not the one it printed") == true, "\(String(describing: result.source))")
    }

    @Test func anotherProtocolVersionIsRefusedWithBothVersions() throws {
        let token = try MigrationChannel.newToken()
        let result = try pair(destination: { fd throws(SwiftletError) in
            // A destination from a future Swiftlet: the next version in its hello.
            let hello: [UInt8] = [MigrationMessage.hello.rawValue, 0, 0, 0, 44, 0, 0, 0] + MigrationChannel.magic
                + LittleEndian.bytes(UInt64(MigrationChannel.version + 1), 4)
                + [UInt8](repeating: 9, count: 32)
            try OwnedFileDescriptor.writeAll(fd: fd, hello)
            var rest = [UInt8](repeating: 0, count: 256)
            _ = try rest.withMutableBytes { raw throws(SwiftletError) in try OwnedFileDescriptor.readSome(fd: fd, into: raw, what: "test") }
        }, source: { fd throws(SwiftletError) in
            _ = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 5000)
        })
        #expect(result.source?.code == .unsupported)
        #expect(result.source?.description.contains("protocol version \(MigrationChannel.version + 1); this Swiftlet speaks \(MigrationChannel.version)") == true,
                "\(String(describing: result.source))")
    }

    @Test func somethingElseThanAMigrationStreamIsRefused() throws {
        let token = try MigrationChannel.newToken()
        let result = try pair(destination: { fd throws(SwiftletError) in
            try OwnedFileDescriptor.writeAll(fd: fd, Array("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".utf8))
        }, source: { fd throws(SwiftletError) in
            _ = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 5000)
        })
        #expect(result.source?.code == .invalidFormat, "\(String(describing: result.source))")
    }

    /// A man in the middle who does not hold the token changes one byte of a message after the
    /// handshake: the destination refuses it.
    @Test func aChangedMessageFailsItsCheck() throws {
        let token = try MigrationChannel.newToken()
        let sockets = try UnixSocket.pair(), relay = try UnixSocket.pair()
        // source <-> sockets.first | sockets.second <-> (relay, flipping a byte of the 4th frame's payload) <-> relay.first | relay.second <-> destination
        let a = sockets.second.rawValue, b = relay.first.rawValue, destinationFD = relay.second.rawValue
        let forward = try OSThread.start(name: "relay-up") {
            var buffer = [UInt8](repeating: 0, count: 65536)
            var total = 0
            while true {
                let n = (try? buffer.withMutableBytes { raw throws(SwiftletError) in try OwnedFileDescriptor.readSome(fd: a, into: raw, what: "relay") }) ?? 0
                if n <= 0 { break }
                // The layout message starts after the source's authenticate frame (8 + 8 + 4 + 32 + 32 bytes).
                let target = 84 + 8 + 2
                if total <= target && target < total + n { buffer[target - total] ^= 0x01 }
                total += n
                _ = try? OwnedFileDescriptor.writeAll(fd: b, Array(buffer[0..<n]))
            }
            UnixSocket.shutdown(b, .both)
        }
        let back = try OSThread.start(name: "relay-down") {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = (try? buffer.withMutableBytes { raw throws(SwiftletError) in try OwnedFileDescriptor.readSome(fd: b, into: raw, what: "relay") }) ?? 0
                if n <= 0 { break }
                _ = try? OwnedFileDescriptor.writeAll(fd: a, Array(buffer[0..<n]))
            }
            UnixSocket.shutdown(a, .both)
        }
        let failure = Mutex<SwiftletError?>(nil)
        let destination = try OSThread.start(name: "destination") {
            do throws(SwiftletError) {
                let channel = try MigrationChannel.accept(destinationFD, token: token, timeoutMilliseconds: 5000)
                _ = try channel.receive(.layout)
            } catch { failure.withLock { $0 = error } }
            UnixSocket.shutdown(destinationFD, .both)
        }
        let channel = try MigrationChannel.connect(sockets.first.rawValue, token: token, timeoutMilliseconds: 5000)
        try channel.send(.layout, [UInt8](repeating: 0x55, count: 100))
        destination.join()
        UnixSocket.shutdown(sockets.first.rawValue, .both)
        forward.join(); back.join()
        let error = try #require(failure.withLock { $0 })
        #expect(error.description.contains("failed its authentication check"), "\(error)")
    }

    @Test func aTruncatedStreamAndAnOversizedFrameAreErrors() throws {
        let token = try MigrationChannel.newToken()
        let truncated = try pair(destination: { fd throws(SwiftletError) in
            try OwnedFileDescriptor.writeAll(fd: fd, [MigrationMessage.hello.rawValue, 0, 0, 0, 44, 0, 0, 0] + MigrationChannel.magic)
        }, source: { fd throws(SwiftletError) in
            _ = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 5000)
        })
        #expect(truncated.source?.description.contains("ended early") == true, "\(String(describing: truncated.source))")
        let huge = try pair(destination: { fd throws(SwiftletError) in
            try OwnedFileDescriptor.writeAll(fd: fd, [MigrationMessage.hello.rawValue, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0x7F])
        }, source: { fd throws(SwiftletError) in
            _ = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 5000)
        })
        #expect(huge.source?.description.contains("byte message (at most") == true, "\(String(describing: huge.source))")
    }

    /// A peer that stops reading: the sender gives up once the socket took nothing for the
    /// channel's time limit, instead of waiting for ever.
    @Test func aPeerThatStopsReadingIsGivenUpOn() throws {
        let token = try MigrationChannel.newToken()
        let result = try pair(destination: { fd throws(SwiftletError) in
            _ = try MigrationChannel.accept(fd, token: token, timeoutMilliseconds: 5000)
            usleep(3_000_000) // reads nothing more
        }, source: { fd throws(SwiftletError) in
            let channel = try MigrationChannel.connect(fd, token: token, timeoutMilliseconds: 300)
            let run = [UInt8](repeating: 1, count: 1 << 20)
            let start = MonotonicClock.now
            while MonotonicClock.now - start < 10_000_000_000 {
                try run.withBytes { raw throws(SwiftletError) in try channel.send(.pages, [], body: raw) }
            }
        })
        #expect(result.source?.description.contains("took nothing for 300 ms") == true, "\(String(describing: result.source))")
    }

    @Test func tokensReadBackFromTheirTextAndBadTextIsRefused() throws {
        let token = try MigrationChannel.newToken()
        let text = MigrationChannel.tokenText(token)
        #expect(text.count == 64)
        #expect(try MigrationChannel.token(fromText: text) == token)
        #expect(try MigrationChannel.token(fromText: text.uppercased()) == token)
        #expect(throws: SwiftletError.self) { try MigrationChannel.token(fromText: String(text.dropLast())) }
        #expect(throws: SwiftletError.self) { try MigrationChannel.token(fromText: String(text.dropLast()) + "g") }
    }
}
