import AgentProtocol
import Glibc
import SwiftletSystem
import Synchronization
import Testing
import TestSupport
@testable import VMM

/// The guest's end of one connection to an `InProcessPort` (the end the vsock device would own),
/// played by a test: an agent that holds a key, or an impostor.
final class GuestEnd: Sendable {
    let fd: Int32
    /// What the host sent, in order.
    let received = Mutex<[AgentMessage]>([])

    init(_ fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    func send(_ message: AgentMessage) {
        AgentFrame.encode(message).withUnsafeBytes { _ = try? OwnedFileDescriptor.writeAll(fd: fd, $0) }
    }

    /// Sends `ready`, then answers the host until it hangs up: a challenge with a proof under
    /// `key` (nil: under the key the host gave, if any), a command with `output` and status 0.
    /// With `readyAfterChallenge`, says `ready` only once the challenge has come.
    func playAgent(key: [UInt8]?, output: String = "real\n", version: UInt32 = AgentMessage.version,
                   readyAfterChallenge: Bool = false) throws -> OSThread {
        try OSThread.start(name: "guest-end") { [self] in
            if !readyAfterChallenge { send(.ready(version: version)) }
            var reader = AgentFrameReader()
            var given: [UInt8]?
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                guard n > 0 else { return }
                reader.append(buffer[0..<n])
                while let message = try? reader.next() {
                    received.withLock { $0.append(message) }
                    switch message {
                    case .agentKey(let bytes): given = given ?? bytes
                    case .challenge(let nonce):
                        if readyAfterChallenge { send(.ready(version: version)) }
                        send(.proof(AgentAuthentication.proof(key: key ?? given ?? [], nonce: nonce)))
                    case .exec: send(.stdout(Array(output.utf8))); send(.exited(status: 0))
                    default: break
                    }
                }
            }
        }
    }

    /// Whether the host has closed its end (dropped the connection) within `milliseconds`: reads
    /// what it sent until the end of the stream, or until nothing more comes in that time. The
    /// wait matters: a child another test forks at that moment holds a copy of the host's end
    /// until it execs, and the end of the stream comes only once that copy is gone.
    func hangsUp(withinMilliseconds milliseconds: Int = 5_000) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
        while (try? Poll.wait([fd], deadline: deadline))?.first == true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { return n == 0 }
        }
        return false
    }

    /// Whether the host has closed its end already (for a connection that must still be open:
    /// nothing closes it, so nothing is waited for).
    var isStillOpen: Bool { !hangsUp(withinMilliseconds: 0) }
}

/// How the host tells the guest agent's connections from other guest processes' (issue 17,
/// finding 2): privileged source ports only, a bounded queue whose connections expire, and a
/// session that opens only once its peer proves it holds the machine's agent key.
@Suite(.serialized) struct AgentAuthenticationTests {
    static let agentPort: UInt32 = 1024

    func bootedMachine() -> Machine {
        Machine(config: MachineConfig(kernelPath: "/nonexistent/vmlinux", cpuCount: 1, memoryMiB: 64))
    }

    /// A machine whose agent holds `key` (as after a restore of a snapshot that kept it).
    func machine(holding key: AgentKey) -> Machine {
        let vm = bootedMachine()
        vm.agentKey.withLock { $0 = .held(key) }
        return vm
    }

    func connect(_ port: InProcessPort, from guestPort: UInt32 = 1000) throws -> GuestEnd {
        GuestEnd(try #require(port.accept(port: Self.agentPort, from: guestPort), "the port refused guest port \(guestPort)"))
    }

    /// The next waiting connection's host end, if one is waiting (the caller closes it).
    func take(_ port: InProcessPort) -> Int32? {
        if let connection = port.next(timeoutMilliseconds: 0) { return connection.release() }
        return nil
    }

    func run(_ session: AgentSession) throws -> (AgentSession.Outcome, String) {
        var fds: [Int32] = [0, 0]
        _ = closeOnExecPipe(&fds)
        defer { close(fds[0]) }
        let outcome = try session.run(ExecRequest(arguments: ["true"]), streams: .init(input: nil, output: fds[1], error: fds[1]))
        close(fds[1])
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = read(fds[0], &buffer, buffer.count)
        return (outcome, String(decoding: buffer[0..<max(0, n)], as: UTF8.self))
    }

    @Test func onlyConnectionsFromPrivilegedGuestPortsAreTaken() throws {
        let port = try InProcessPort(port: Self.agentPort)
        // Linux gives an unbound socket a port above 1023; only CAP_NET_BIND_SERVICE binds below.
        #expect(port.accept(port: Self.agentPort, from: 1024) == nil)
        #expect(port.accept(port: Self.agentPort, from: 49_152) == nil)
        #expect(port.accept(port: Self.agentPort, from: UInt32.max) == nil)
        #expect(port.refusedConnections == 3 && port.pendingConnections == 0)
        #expect(take(port) == nil, "a refused connection is never handed out")
        #expect(port.accept(port: 2048, from: 1000) == nil, "another host port is not this one")
        let privileged = try connect(port, from: InProcessPort.highestPrivilegedPort)
        #expect(port.pendingConnections == 1)
        let taken = try #require(take(port))
        close(taken)
        withExtendedLifetime(privileged) {}
    }

    @Test func pendingConnectionsAreBoundedAndTheOldestGoFirst() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let ends = try (0..<(InProcessPort.maximumPending + 4)).map { try connect(port, from: 600 + UInt32($0)) }
        #expect(port.pendingConnections == InProcessPort.maximumPending)
        for (index, end) in ends.enumerated() {
            #expect(index < 4 ? end.hangsUp() : end.isStillOpen, "connection \(index)")
        }
        // The oldest kept one is next.
        let next = try #require(take(port))
        defer { close(next) }
        ends[4].send(.ready(version: 1))
        #expect(try Poll.waitReadable(next, timeoutMilliseconds: 10_000), "the connection handed out is the fifth's")
    }

    @Test func pendingConnectionsNobodyTakesExpire() throws {
        let port = try InProcessPort(port: Self.agentPort, maximumAgeMilliseconds: 50)
        let old = try connect(port)
        usleep(200_000)
        #expect(take(port) == nil, "a connection older than the limit is not handed out")
        #expect(old.hangsUp() && port.pendingConnections == 0)
        // One that came later is, and so is the queue's expiry on arrival.
        let first = try connect(port, from: 1001)
        usleep(200_000)
        let fresh = try connect(port, from: 1002)
        #expect(first.hangsUp() && port.pendingConnections == 1)
        let taken = try #require(take(port))
        close(taken)
        withExtendedLifetime(fresh) {}
    }

    @Test func waitUntilReadyTimesOutWithAClearError() throws {
        let pair = try UnixSocket.pair()
        let silentPeer = pair.second
        let session = AgentSession(socket: pair.first)
        let error = #expect(throws: SwiftletError.self) { try session.waitUntilReady(timeoutMilliseconds: 100) }
        #expect(error?.message == "the guest agent did not say it was ready within 100 ms", "\(String(describing: error))")
        withExtendedLifetime(silentPeer) {}
    }

    /// The key and the challenge go out as soon as a connection is taken, not after its `ready`,
    /// so the handshake costs the guest one round trip: a peer that says `ready` only once the
    /// challenge is there opens a session (a host that waited for `ready` first would wait for it
    /// until the handshake's time ran out).
    @Test func theChallengeDoesNotWaitForReady() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let key = try AgentKey.random()
        let vm = machine(holding: key)
        let agent = try connect(port)
        let agentThread = try agent.playAgent(key: key.bytes, readyAfterChallenge: true)
        let session = try #require(try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 5_000, handshakeTimeoutMilliseconds: 2_000))
        let (outcome, output) = try run(session)
        #expect(outcome.status == 0 && output == "real\n")
        session.shutdown()
        agentThread.join()
    }

    @Test func aBootedMachineGivesItsKeyOnceThenOnlyAsksForTheProof() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let vm = bootedMachine()
        #expect(vm.heldAgentKey == nil)
        let first = try connect(port)
        let firstAgent = try first.playAgent(key: nil)
        let session = try #require(try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 10_000))
        let key = try #require(vm.heldAgentKey, "the agent proved the key: snapshots keep it")
        #expect(key.bytes.count == AgentAuthentication.keyLength)
        let sawFirst = first.received.withLock { $0 }
        #expect(sawFirst.count == 2 && sawFirst.first == .agentKey(key.bytes))

        // The next session (openSession) proves the same key and is not given it.
        let second = try connect(port, from: 1001)
        let secondAgent = try second.playAgent(key: key.bytes)
        let other = try #require(try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 10_000))
        #expect(second.received.withLock { $0 }.allSatisfy { if case .challenge = $0 { true } else { false } })
        other.shutdown(); session.shutdown()
        firstAgent.join(); secondAgent.join()
    }

    /// An impostor that got in first (a root guest process could: the source port does not stop
    /// it) and cannot prove the key is dropped before it sees anything but the challenge; the
    /// real agent's connection after it is the session, and the command runs there.
    @Test func peersThatCannotProveTheKeyAreDroppedAndTheAgentIsUsed() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let key = try AgentKey.random()
        let vm = machine(holding: key)
        let wrongKey = try connect(port, from: 1000)
        let wrongKeyThread = try wrongKey.playAgent(key: Array(repeating: 7, count: 32), output: "forged\n")
        // A guess at the key: the impostor plays along, but the host never gives a held key again.
        let guessing = try connect(port, from: 1001)
        let guessingThread = try guessing.playAgent(key: nil, output: "forged\n")
        let silent = try connect(port, from: 1002)
        let garbled = try connect(port, from: 1003)
        garbled.send(.ready(version: AgentMessage.version))
        _ = [UInt8](repeating: 0xFF, count: 8).withUnsafeBytes { write(garbled.fd, $0.baseAddress, $0.count) }
        let agent = try connect(port, from: 1004)
        let agentThread = try agent.playAgent(key: key.bytes)

        var reasons: [String] = []
        let session = try #require(try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 20_000, handshakeTimeoutMilliseconds: 300,
                                                         dropped: { reasons.append($0) }))
        let (outcome, output) = try run(session)
        #expect(outcome.status == 0 && output == "real\n")
        #expect(reasons.count == 4, "\(reasons)")
        #expect(reasons.first?.contains("not the guest agent") == true, "\(reasons)")
        #expect(reasons.contains { $0.contains("did not prove it is the guest agent within 300 ms") || $0.contains("did not say it was ready within 300 ms") }, "\(reasons)")
        for impostor in [wrongKey, guessing] {
            let saw = impostor.received.withLock { $0 }
            #expect(saw.count == 1 && saw.allSatisfy { if case .challenge = $0 { true } else { false } }, "an impostor saw \(saw)")
        }
        for end in [wrongKey, guessing, silent, garbled] { #expect(end.hangsUp()) }
        #expect(vm.heldAgentKey == key)
        session.shutdown()
        wrongKeyThread.join(); guessingThread.join(); agentThread.join()
    }

    @Test func aRestoredMachineWithoutAKeyTrustsNoConnection() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let vm = bootedMachine()
        vm.agentKey.withLock { $0 = .missing }
        let error = #expect(throws: SwiftletError.self) { try AgentSession.open(on: port, for: vm, timeoutMilliseconds: 0) }
        #expect(error?.message.contains("holds no agent key") == true, "\(String(describing: error))")
    }

    @Test func anAgentOfAnotherProtocolVersionIsReported() throws {
        let port = try InProcessPort(port: Self.agentPort)
        let old = try connect(port)
        let thread = try old.playAgent(key: nil, version: AgentMessage.version - 1)
        let error = #expect(throws: SwiftletError.self) { try AgentSession.open(on: port, for: bootedMachine(), timeoutMilliseconds: 10_000) }
        #expect(error?.message.contains("rebuild the guest image") == true, "\(String(describing: error))")
        thread.join() // it ends when the host drops the connection
    }
}
