import AgentProtocol
import CLinux
import Glibc
import SwiftletSystem
import Synchronization
import Testing
import TestSupport
@testable import VMM

/// `swiftlet-init` as an ordinary process (`--unix SOCKET`), driven by the host's `AgentSession`:
/// everything the agent does except the guest's mounts, without booting a VM.
@Suite(.serialized, .enabled(if: access(TestHost.agentBinary, X_OK) == 0, "swiftlet-init is not built"))
struct AgentTests {
    let dir = TemporaryDirectory()

    /// Starts the agent, accepts its connection, waits for `ready`, runs `body`, then hangs up.
    func withAgent(_ body: (AgentSession) throws -> Void) throws {
        let listener = try #require(UnixSocketListener(path: dir.path + "/agent.sock"))
        let agent = TestHost.agentBinary, path = listener.path
        let thread = try OSThread.start(name: "agent") { _ = Subprocess.run([agent, "--unix", path], timeout: 120) }
        defer { thread.join() }
        let fd = try #require(listener.accept(), "the agent did not connect")
        let session = AgentSession(socket: OwnedFileDescriptor(taking: fd))
        #expect(try session.waitUntilReady())
        try body(session)
    }

    /// Runs a command with stdin from `input`, collecting stdout and stderr in files.
    func run(_ session: AgentSession, _ request: ExecRequest, input: [UInt8]? = nil, signals: Int32? = nil)
        throws -> (outcome: AgentSession.Outcome, stdout: [UInt8], stderr: [UInt8]) {
        let out = dir.write("out", []), err = dir.write("err", [])
        let outFD = open(out, O_WRONLY | O_TRUNC), errFD = open(err, O_WRONLY | O_TRUNC)
        defer { close(outFD); close(errFD) }
        var inFD: Int32?
        if let input { inFD = open(dir.write("in", input), O_RDONLY) }
        defer { if let inFD { close(inFD) } }
        let outcome = try session.run(request, streams: .init(input: inFD, output: outFD, error: errFD, signals: signals))
        return (outcome, try OwnedFileDescriptor.readSmallFile(out, limit: 64 << 20), try OwnedFileDescriptor.readSmallFile(err))
    }

    @Test func exitStatusAndSeparateStreams() throws {
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["sh", "-c", "echo out; echo err >&2; exit 7"]))
            #expect(r.outcome == .init(status: 7, failure: nil))
            #expect(r.stdout == Array("out\n".utf8))
            #expect(r.stderr == Array("err\n".utf8))
            // A second command in the same session.
            let again = try run(session, ExecRequest(arguments: ["true"]))
            #expect(again.outcome.status == 0 && again.stdout.isEmpty)
        }
    }

    /// A connection that breaks under the agent (as a restore resets vsock connections) is made
    /// again and served like the first; the command it was running is ended.
    @Test func aLostConnectionIsMadeAgain() throws {
        let listener = try #require(UnixSocketListener(path: dir.path + "/agent.sock"))
        let agent = TestHost.agentBinary, path = listener.path
        let thread = try OSThread.start(name: "agent") { _ = Subprocess.run([agent, "--unix", path], timeout: 120) }
        defer {
            listener.shutdown() // an agent that took the end for a lost connection cannot connect again
            thread.join()
        }
        let first = try #require(listener.accept(), "the agent did not connect")
        // Start a long command, then close with the agent's messages unread: the agent's next
        // read fails with ECONNRESET instead of reading end of file.
        let pidFile = dir.path + "/pid"
        let long = AgentFrame.encode(.exec(ExecRequest(arguments: ["sh", "-c", "echo $$ > \(pidFile); exec sleep 60"])))
        _ = long.withUnsafeBytes { write(first, $0.baseAddress, $0.count) }
        var pid: Int32?
        for _ in 0..<500 where pid == nil {
            pid = (try? OwnedFileDescriptor.readSmallTextFile(pidFile)).flatMap { Int32($0.split(separator: "\n").first ?? "") }
            if pid == nil { usleep(10_000) }
        }
        let sleeper = try #require(pid, "the command did not start")
        close(first)
        let second = try #require(listener.accept(), "the agent did not connect again")
        let session = AgentSession(socket: OwnedFileDescriptor(taking: second))
        #expect(try session.waitUntilReady())
        let r = try run(session, ExecRequest(arguments: ["sh", "-c", "echo served again"]))
        #expect(r.outcome.status == 0 && r.stdout == Array("served again\n".utf8))
        var gone = false
        for _ in 0..<500 where !gone {
            gone = kill(sleeper, 0) != 0
            if !gone { usleep(10_000) }
        }
        #expect(gone, "the command of the lost connection was ended")
    }

    /// Waits for a command to write its pid to `path`.
    func pid(in path: String) throws -> Int32 {
        var pid: Int32?
        for _ in 0..<500 where pid == nil {
            pid = (try? OwnedFileDescriptor.readSmallTextFile(path)).flatMap { Int32($0.split(separator: "\n").first ?? "") }
            if pid == nil { usleep(10_000) }
        }
        return try #require(pid, "the command did not start")
    }

    func ends(_ pid: Int32) -> Bool {
        for _ in 0..<500 {
            if kill(pid, 0) != 0 { return true }
            usleep(10_000)
        }
        return false
    }

    /// `openSession`: the agent opens another connection whose commands run beside the first
    /// connection's; closing it ends its own command only.
    @Test func sessionsRunSideBySide() throws {
        let listener = try #require(UnixSocketListener(path: dir.path + "/agent.sock"))
        let agent = TestHost.agentBinary, path = listener.path
        let thread = try OSThread.start(name: "agent") { _ = Subprocess.run([agent, "--unix", path], timeout: 120) }
        defer { thread.join() }
        let main = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "the agent did not connect")))
        #expect(try main.waitUntilReady())
        try main.send(.exec(ExecRequest(arguments: ["sh", "-c", "echo $$ > \(dir.path)/first; exec sleep 60"])))
        let first = try pid(in: dir.path + "/first")

        try main.send(.openSession)
        let extra = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "no second connection")))
        #expect(try extra.waitUntilReady())
        let r = try run(extra, ExecRequest(arguments: ["sh", "-c", "kill -0 \(first) && echo beside"]))
        #expect(r.outcome.status == 0 && r.stdout == Array("beside\n".utf8), "the second session runs while the first's command does")
        try extra.send(.exec(ExecRequest(arguments: ["sh", "-c", "echo $$ > \(dir.path)/second; exec sleep 60"])))
        let second = try pid(in: dir.path + "/second")
        extra.shutdown()
        #expect(ends(second), "closing a session ends its command")
        #expect(kill(first, 0) == 0, "and only its own")

        try main.send(.openSession)
        let third = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "no third connection")))
        #expect(try third.waitUntilReady())
        #expect(try run(third, ExecRequest(arguments: ["true"])).outcome.status == 0)
        main.shutdown()
        #expect(ends(first), "the first connection's end ends its command")
    }

    /// The agent keeps the first key it is given, proves it on every challenge (in the sessions it
    /// opens later too), and cannot prove a key it was not given.
    @Test func theAgentProvesTheFirstKeyItWasGiven() throws {
        let listener = try #require(UnixSocketListener(path: dir.path + "/agent.sock"))
        let agent = TestHost.agentBinary, path = listener.path
        let thread = try OSThread.start(name: "agent") { _ = Subprocess.run([agent, "--unix", path], timeout: 120) }
        defer { thread.join() }
        let main = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "the agent did not connect")))
        #expect(try main.waitUntilReady())
        let key = try AgentKey.random(), other = try AgentKey.random()
        let keyless = #expect(throws: SwiftletError.self) { try main.authenticate(key: key, give: false, nil) }
        #expect(keyless?.message.contains("could not prove") == true, "\(String(describing: keyless))")
        try main.authenticate(key: key, give: true, nil)
        let second = #expect(throws: SwiftletError.self) { try main.authenticate(key: other, give: true, nil) }
        #expect(second?.message.contains("does not match") == true, "the agent keeps its first key: \(String(describing: second))")
        try main.authenticate(key: key, give: false, nil)

        try main.send(.openSession)
        let extra = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "no second connection")))
        #expect(try extra.waitUntilReady())
        try extra.authenticate(key: key, give: false, nil)
        #expect(try run(extra, ExecRequest(arguments: ["true"])).outcome.status == 0)
        extra.shutdown()
        main.shutdown()
    }

    /// `identity` with no hostname reseeds the kernel's generator (here the host's: RNDADDENTROPY
    /// needs root, so an unprivileged run must report that it could not) and keeps the hostname.
    @Test func anIdentityWithoutHostnameReseedsAndKeepsTheName() throws {
        var before = [CChar](repeating: 0, count: 256)
        gethostname(&before, 255)
        let listener = try #require(UnixSocketListener(path: dir.path + "/agent.sock"))
        let agent = TestHost.agentBinary, path = listener.path
        let stderr = Mutex("")
        let thread = try OSThread.start(name: "agent") {
            let r = Subprocess.run([agent, "--unix", path], timeout: 120)
            stderr.withLock { $0 = r.stderr }
        }
        let session = AgentSession(socket: OwnedFileDescriptor(taking: try #require(listener.accept(), "the agent did not connect")))
        #expect(try session.waitUntilReady())
        try session.announceNewIdentity(hostname: nil)
        // Messages are handled in order: once this command ran, the identity was applied.
        #expect(try run(session, ExecRequest(arguments: ["true"])).outcome.status == 0)
        session.shutdown()
        thread.join()
        var after = [CChar](repeating: 0, count: 256)
        gethostname(&after, 255)
        #expect(before == after)
        let log = stderr.withLock { $0 }
        if getuid() == 0 {
            #expect(!log.contains("cannot reseed"), "\(log)")
        } else {
            #expect(log.contains("cannot reseed the kernel's random generator"), "\(log)")
        }
    }

    @Test func anAgentThatIsNoGuestInitRefusesToChangeItsRootAndCarriesOn() throws {
        try withAgent { session throws in
            let error = #expect(throws: SwiftletError.self) { try session.mountRoot(devices: ["/dev/vda"]) }
            #expect(error?.message.contains("the agent is not the guest's init") == true, "\(String(describing: error))")
            #expect(try run(session, ExecRequest(arguments: ["sh", "-c", "echo still here"])).stdout == Array("still here\n".utf8))
            session.shutdown()
        }
    }

    @Test func anAgentThatIsNoGuestInitRefusesToSetUpTheNetworkAndCarriesOn() throws {
        try withAgent { session throws in
            let error = #expect(throws: SwiftletError.self) { try session.configureNetwork(AgentSessionNetworkTests.setup) }
            #expect(error?.code == .guestFailure)
            #expect(error?.message.contains("the agent is not the guest's init: it does not set up this system's network") == true,
                    "\(String(describing: error))")
            #expect(try run(session, ExecRequest(arguments: ["sh", "-c", "echo still here"])).stdout == Array("still here\n".utf8))
            session.shutdown()
        }
    }

    @Test func missingAndUnrunnableCommands() throws {
        let script = dir.write("not-executable", Array("echo hi\n".utf8), mode: 0o644)
        try withAgent { session in
            let missing = try run(session, ExecRequest(arguments: ["no-such-command-here"]))
            #expect(missing.outcome.status == 127)
            #expect(missing.outcome.failure?.contains("no-such-command-here: command not found") == true)
            let refused = try run(session, ExecRequest(arguments: [script]))
            #expect(refused.outcome.status == 126)
            let badUser = try run(session, ExecRequest(arguments: ["true"], user: "no-such-user"))
            #expect(badUser.outcome.status == 126)
            #expect(badUser.outcome.failure?.contains("unable to find user no-such-user") == true)
            let noDirectory = try run(session, ExecRequest(arguments: ["true"], workingDirectory: dir.path + "/no-such-directory"))
            #expect(noDirectory.outcome.status == 126)
            #expect(noDirectory.outcome.failure?.contains("cannot change to the working directory \(dir.path)/no-such-directory") == true,
                    "\(String(describing: noDirectory.outcome.failure))")
            // The agent still serves after each refusal.
            #expect(try run(session, ExecRequest(arguments: ["sh", "-c", "echo ok"])).stdout == Array("ok\n".utf8))
        }
    }

    /// A command starts as its own session's leader, with default signal dispositions and nothing
    /// blocked (the agent ignores SIGPIPE and blocks SIGCHLD for itself), and only its three streams open.
    @Test func aCommandStartsCleanInASessionOfItsOwn() throws {
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["sh", "-c", "cat /proc/self/status; echo stat $(cat /proc/$$/stat); echo fds; ls /proc/$$/fd"]))
            #expect(r.outcome.status == 0, "\(String(decoding: r.stderr, as: UTF8.self))")
            let lines = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n")
            #expect(lines.contains("SigBlk:\t0000000000000000"), "\(lines)")
            #expect(lines.contains("SigIgn:\t0000000000000000"), "\(lines)")
            // /proc/PID/stat: pid (comm) state ppid pgrp session ...
            let stat = try #require(lines.first { $0.hasPrefix("stat ") }).split(separator: " ")
            #expect(stat.count > 6 && stat[1] == stat[5] && stat[1] == stat[6], "\(stat)")
            // Nothing of the agent's (its connection, signalfd, other commands' pipes) is inherited.
            let fds = lines.drop { $0 != "fds" }.dropFirst()
            #expect(Array(fds) == ["0", "1", "2"], "\(fds)")
        }
    }

    @Test func aCommandThatClosesItsInputEarlyIsNotAProblem() throws {
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["sh", "-c", "exec 0<&-; sleep 0.2; echo done"]),
                            input: [UInt8](repeating: 7, count: 1 << 20))
            #expect(r.outcome.status == 0)
            #expect(r.stdout == Array("done\n".utf8))
            // The agent is still serving.
            #expect(try run(session, ExecRequest(arguments: ["true"])).outcome.status == 0)
        }
    }

    @Test func binaryInputAndOutputPassThroughIntact() throws {
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in bytes.indices { state = state &* 6364136223846793005 &+ 1442695040888963407; bytes[i] = UInt8(truncatingIfNeeded: state >> 33) }
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["cat"]), input: bytes)
            #expect(r.outcome.status == 0)
            #expect(r.stdout.count == bytes.count)
            #expect(r.stdout == bytes)
        }
    }

    @Test func environmentWorkingDirectoryAndUser() throws {
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["sh", "-c", "pwd; echo $FOO; id -u; id -g; echo $PATH"],
                                                 environment: ["FOO=bar baz"], workingDirectory: "/tmp", user: "65534:65533"))
            #expect(r.outcome.status == 0, "\(String(decoding: r.stderr, as: UTF8.self))")
            let lines = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n")
            #expect(lines.prefix(4) == ["/tmp", "bar baz", "65534", "65533"])
            #expect(lines.last?.contains("/usr/bin") == true, "a default PATH")
        }
    }

    @Test func signalsReachTheCommandAndDeathBySignalIs128PlusN() throws {
        try withAgent { session in
            let selfKilled = try run(session, ExecRequest(arguments: ["sh", "-c", "kill -TERM $$"]))
            #expect(selfKilled.outcome.status == 143)

            var wanted = [SIGUSR1]
            let signals = swiftlet_signalfd(&wanted, 1)
            defer { close(signals); _ = swiftlet_unblock_signal(SIGUSR1) }
            let me = pthread_self()
            let sender = try OSThread.start(name: "signal") { usleep(300_000); pthread_kill(me, SIGUSR1) }
            defer { sender.join() }
            let interrupted = try run(session, ExecRequest(arguments: ["sleep", "30"]), signals: signals)
            #expect(interrupted.outcome.status == 128 + SIGUSR1)
        }
    }

    @Test func aTerminalCarriesBothStreamsAndItsSize() throws {
        try withAgent { session in
            let r = try run(session, ExecRequest(arguments: ["sh", "-c", "tty; stty size; echo to-stderr >&2"],
                                                 terminal: true, rows: 50, columns: 132))
            let text = String(decoding: r.stdout, as: UTF8.self)
            #expect(r.outcome.status == 0)
            #expect(text.contains("/dev/pts/"), "\(text)")
            #expect(text.contains("50 132"), "\(text)")
            #expect(text.contains("to-stderr"), "\(text)")
            #expect(r.stderr.isEmpty)
        }
    }
}

/// `AgentSession.configureNetwork` against a scripted peer on a socket pair.
@Suite struct AgentSessionNetworkTests {
    static let setup = NetworkSetup(address: "10.0.2.15", prefixLength: 24, gateway: "10.0.2.2", dns: ["10.0.2.3"], mtu: 65520,
                                    hostName: "host.swiftlet.internal", mac: [0x02, 0x53, 0x57, 0, 0, 1])

    /// Runs `configureNetwork(setup)` with a peer that reads one message and answers `answers`
    /// (then hangs up); returns what the peer read and what the call threw.
    func configure(_ setup: NetworkSetup = Self.setup, answers: [AgentMessage]) throws -> (received: AgentMessage?, error: SwiftletError?) {
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        let session = AgentSession(socket: OwnedFileDescriptor(taking: fds[0]))
        let peer = fds[1]
        let received = Mutex<AgentMessage?>(nil)
        let thread = try OSThread.start(name: "peer") {
            var reader = AgentFrameReader()
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                if let message = try? reader.next() { received.withLock { $0 = message }; break }
                let n = read(peer, &buffer, buffer.count)
                if n <= 0 { break }
                reader.append(buffer[0..<n])
            }
            for answer in answers {
                let frame = AgentFrame.encode(answer)
                _ = frame.withUnsafeBytes { write(peer, $0.baseAddress, $0.count) }
            }
            close(peer)
        }
        var caught: SwiftletError?
        do { try session.configureNetwork(setup) } catch { caught = error }
        session.shutdown()
        thread.join()
        return (received.withLock { $0 }, caught)
    }

    @Test func theSetupGoesOutAndTheAnswerEndsTheCall() throws {
        // Output of an earlier command still on its way is passed over.
        let r = try configure(answers: [.stdout([1]), .networkConfigured])
        #expect(r.received == .configureNetwork(Self.setup))
        #expect(r.error == nil)
    }

    @Test func theGuestsFailureIsReportedWithItsMessage() throws {
        let r = try configure(answers: [.failed(status: 1, message: "no interface with MAC 02:53:57:00:00:01")])
        #expect(r.error?.code == .guestFailure)
        #expect(r.error?.message == "the guest could not set up its network: no interface with MAC 02:53:57:00:00:01")
        let hungUp = try configure(answers: [])
        #expect(hungUp.error?.code == .guestFailure)
        #expect(hungUp.error?.message.contains("hung up while setting up its network") == true)
    }

    @Test func aMalformedSetupIsNeverSent() throws {
        var setup = Self.setup
        setup.hostName = "host\n0.0.0.0 example.com"
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[1]) }
        let session = AgentSession(socket: OwnedFileDescriptor(taking: fds[0]))
        let error = #expect(throws: SwiftletError.self) { try session.configureNetwork(setup) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("is not a host name") == true, "\(String(describing: error))")
        var byte: UInt8 = 0
        #expect(recv(fds[1], &byte, 1, Int32(MSG_DONTWAIT)) == -1 && errno == EAGAIN, "nothing was sent")
    }
}
