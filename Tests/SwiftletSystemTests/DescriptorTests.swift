import Glibc
import SystemPackage
import Testing
@testable import SwiftletSystem

/// Unix sockets, descriptor passing, pipes, signalfd, poll, and work on threads of its own.
@Suite struct DescriptorTests {
    /// A fresh directory for sockets, removed with what is in it afterwards.
    private func withDirectory(_ body: (String) throws -> Void) throws {
        var template = Array("/tmp/swiftlet-sock.XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        #expect(made != nil)
        let directory = String(cString: made!)
        defer {
            for entry in OwnedFileDescriptor.directoryEntries(directory) ?? [] { unlink(directory + "/" + entry.name) }
            rmdir(directory)
        }
        try body(directory)
    }

    private func send(_ text: String, on socket: Int32, passing fds: [Int32] = []) throws {
        try Array(text.utf8).withUnsafeBytes { try UnixSocket.sendAll(socket, $0, passing: fds) }
    }

    private func receive(on socket: Int32, descriptors: inout OwnedFileDescriptors, maximum: Int = 8) throws -> String {
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = try buffer.withUnsafeMutableBytes { raw in
            try UnixSocket.receive(socket, into: raw, descriptors: &descriptors, maximumDescriptors: maximum)
        }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }

    /// Whether the pipe's read end reports end of file within a second: every write end is closed.
    private func readsEndOfFile(_ readEnd: Int32) throws -> Bool {
        guard try Poll.waitReadable(readEnd, timeoutMilliseconds: 1000) else { return false }
        var byte: UInt8 = 0
        return read(readEnd, &byte, 1) == 0
    }

    @Test func listensAcceptsAndConnects() throws {
        try withDirectory { directory in
            let path = directory + "/control.sock"
            let listener = try UnixSocket.listen(at: path, backlog: 4)
            let client = try UnixSocket.connect(to: path)
            let server = try UnixSocket.accept(listener.rawValue)!
            try send("hello", on: client.rawValue)
            var none = OwnedFileDescriptors()
            let text = try receive(on: server.rawValue, descriptors: &none)
            #expect(text == "hello")
            let noneCame = none.isEmpty
            #expect(noneCame)
            UnixSocket.shutdown(client.rawValue, .writing)
            let end = try receive(on: server.rawValue, descriptors: &none)
            #expect(end == "", "end of stream")
            // A non-blocking listener with nothing pending: no connection, no error.
            try OwnedFileDescriptor.setNonBlocking(fd: listener.rawValue)
            let pending = try UnixSocket.accept(listener.rawValue)
            let nonePending = pending == nil
            #expect(nonePending)
            #expect(fcntl(server.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        }
    }

    @Test func socketPathsTooLongForSunPathAreAClearError() throws {
        let path = "/tmp/" + String(repeating: "d", count: UnixSocket.maximumPathLength)
        for attempt in [{ try UnixSocket.connect(to: path) }, { try UnixSocket.listen(at: path) }] {
            #expect { _ = try attempt() } throws: {
                let e = $0 as! SwiftletError
                return e.code == .invalidArgument && e.message.contains("too long") && e.cause == .fileNameTooLong
            }
        }
        #expect { _ = try UnixSocket.connect(to: "/nonexistent/swiftlet.sock") } throws: {
            ($0 as! SwiftletError).message == "cannot connect to /nonexistent/swiftlet.sock"
        }
    }

    @Test func descriptorsTravelWithTheBytes() throws {
        let pair = try UnixSocket.pair()
        let pipe = try OwnedFileDescriptor.pipe()
        try send("with-fd", on: pair.first.rawValue, passing: [pipe.writeEnd.rawValue])
        var received = OwnedFileDescriptors()
        let text = try receive(on: pair.second.rawValue, descriptors: &received)
        #expect(text == "with-fd")
        let count = received.count
        #expect(count == 1)
        let passed = received.removeFirst()!
        #expect(fcntl(passed.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        try [UInt8(7)].withUnsafeBytes { try passed.writeAll($0) }
        var byte: UInt8 = 0
        #expect(read(pipe.readEnd.rawValue, &byte, 1) == 1 && byte == 7)
    }

    @Test func moreDescriptorsThanExpectedIsAnErrorAndClosesThemAll() throws {
        let pair = try UnixSocket.pair()
        let pipe = try OwnedFileDescriptor.pipe()
        let readEnd = pipe.readEnd
        do {
            let writeEnd = pipe.writeEnd
            try send("x", on: pair.first.rawValue, passing: [writeEnd.rawValue, writeEnd.rawValue, writeEnd.rawValue])
        }
        var received = OwnedFileDescriptors()
        do {
            _ = try receive(on: pair.second.rawValue, descriptors: &received, maximum: 2)
            Issue.record("three descriptors were accepted where two were expected")
        } catch {
            let e = error as! SwiftletError
            #expect(e.code == .invalidFormat && e.message.contains("all were closed"))
        }
        let noneKept = received.isEmpty
        #expect(noneKept)
        #expect(try readsEndOfFile(readEnd.rawValue), "no copy of the write end is left open")
        #expect { try [UInt8](repeating: 0, count: 9).withUnsafeBytes { try UnixSocket.sendAll(pair.first.rawValue, $0, passing: Array(repeating: 0, count: 9)) } } throws: {
            ($0 as! SwiftletError).code == .invalidArgument
        }
    }

    @Test func sendAllSendsEverythingToAPeerThatReadsSlowly() throws {
        let pair = try UnixSocket.pair()
        let total = 1 << 20
        let reader = pair.second.rawValue
        let worker = try WorkerThread(name: "reader") { () throws(SwiftletError) -> Int in
            var got = 0
            var buffer = [UInt8](repeating: 0, count: 4096)
            var none = OwnedFileDescriptors()
            while got < total {
                let n = try buffer.withMutableBytes { raw throws(SwiftletError) in try UnixSocket.receive(reader, into: raw, descriptors: &none) }
                if n == 0 { break }
                got += n
            }
            return got
        }
        try [UInt8](repeating: 1, count: total).withUnsafeBytes { try UnixSocket.sendAll(pair.first.rawValue, $0) }
        #expect(worker.wait() == .success(total))
    }

    @Test func ownedDescriptorsCloseWhatTheyStillHold() throws {
        let pipe = try OwnedFileDescriptor.pipe()
        let readEnd = pipe.readEnd
        let kept: OwnedFileDescriptor
        do {
            var all = OwnedFileDescriptors()
            all.append(pipe.writeEnd)
            all.append(try OwnedFileDescriptor.open("/dev/null", flags: O_RDONLY))
            let count = all.count
            #expect(count == 2)
            kept = all.removeFirst()!
            let left = all.rawValues.count
            #expect(left == 1)
        }
        #expect(!(try Poll.waitReadable(readEnd.rawValue, timeoutMilliseconds: 0)), "the write end taken out stays open")
        _ = consume kept
        #expect(try readsEndOfFile(readEnd.rawValue))
    }

    @Test func pipesAreCloseOnExecAndCarryBytes() throws {
        let pipe = try OwnedFileDescriptor.pipe()
        #expect(fcntl(pipe.readEnd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(fcntl(pipe.writeEnd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        try [UInt8]([1, 2, 3]).withUnsafeBytes { try pipe.writeEnd.writeAll($0) }
        var buffer = [UInt8](repeating: 0, count: 8)
        let n = try buffer.withUnsafeMutableBytes { try OwnedFileDescriptor.readSome(fd: pipe.readEnd.rawValue, into: $0, what: "the pipe") }
        #expect(Array(buffer[0..<n]) == [1, 2, 3])
        try OwnedFileDescriptor.setNonBlocking(fd: pipe.readEnd.rawValue)
        #expect { try buffer.withUnsafeMutableBytes { try OwnedFileDescriptor.readSome(fd: pipe.readEnd.rawValue, into: $0, what: "the pipe") } } throws: {
            ($0 as! SwiftletError).cause == .resourceTemporarilyUnavailable
        }
    }

    @Test func pollSaysWhichAreReadyAndWhenTimeRunsOut() throws {
        let quiet = try OwnedFileDescriptor.pipe()
        let busy = try OwnedFileDescriptor.pipe()
        try [UInt8(1)].withUnsafeBytes { try busy.writeEnd.writeAll($0) }
        #expect(try Poll.wait([quiet.readEnd.rawValue, busy.readEnd.rawValue, -1]) == [false, true, false])
        #expect(try Poll.wait([quiet.readEnd.rawValue], timeoutMilliseconds: 0) == [false])
        let start = MonotonicClock.now
        #expect(try Poll.wait([quiet.readEnd.rawValue], timeoutMilliseconds: 30) == [false])
        #expect(MonotonicClock.now - start >= 30_000_000)
        #expect(try !Poll.waitReadable(quiet.readEnd.rawValue, timeoutMilliseconds: 1))
    }

    @Test func pollEndsAtItsDeadlineThoughSignalsInterruptIt() throws {
        let pipe = try OwnedFileDescriptor.pipe()
        let fd = pipe.readEnd.rawValue
        let worker = try WorkerThread(name: "poller") { () throws(SwiftletError) -> UInt64 in
            let start = MonotonicClock.now
            guard try !Poll.waitReadable(fd, timeoutMilliseconds: 200) else { return 0 }
            return MonotonicClock.now - start
        }
        while !worker.hasEnded {
            worker.interrupt()
            usleep(5_000)
        }
        let elapsed = try worker.wait().get()
        #expect(elapsed >= 200_000_000)
        #expect(elapsed < 2_000_000_000)
    }

    @Test func signalFDReadsTheSignalsItBlocks() throws {
        // On a thread of its own: the mask it changes is that thread's.
        let worker = try WorkerThread(name: "signals") { () throws(SwiftletError) -> [Int32?] in
            let signals = try SignalFD(blocking: [SIGUSR2])
            let before = signals.next()
            pthread_kill(pthread_self(), SIGUSR2)
            let ready = try Poll.waitReadable(signals.rawValue, timeoutMilliseconds: 1000)
            let first = signals.next(), second = SignalFD.next(from: signals.rawValue)
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, SIGUSR2)
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            return [before, ready ? 1 : 0, first, second]
        }
        #expect(worker.wait() == .success([nil, 1, SIGUSR2, nil]))
    }

    @Test func workerThreadsSayWhenTheyEndAndHowItWent() throws {
        let gate = try OwnedFileDescriptor.pipe()
        let gateFD = gate.readEnd.rawValue
        let worker = try WorkerThread(name: "worker") { () throws(SwiftletError) -> Int in
            _ = try Poll.waitReadable(gateFD)
            return 42
        }
        #expect(!worker.hasEnded)
        #expect(try !Poll.waitReadable(worker.ended, timeoutMilliseconds: 20))
        try [UInt8(1)].withUnsafeBytes { try gate.writeEnd.writeAll($0) }
        #expect(try Poll.waitReadable(worker.ended, timeoutMilliseconds: 5000))
        #expect(worker.hasEnded)
        #expect(worker.wait() == .success(42))
        #expect(worker.wait() == .success(42), "waiting again returns the same")

        let failing = try WorkerThread<Int>(name: "failing") { () throws(SwiftletError) -> Int in
            throw SwiftletError(.notFound, "nothing here")
        }
        #expect(failing.wait() == .failure(SwiftletError(.notFound, "nothing here")))
    }

    @Test func pendingResultsKeepTheFirstValue() throws {
        let pending = try PendingResult<String>()
        #expect(pending.result == nil)
        #expect(try !Poll.waitReadable(pending.ended, timeoutMilliseconds: 0))
        pending.set(.success("first"))
        pending.set(.success("second"))
        #expect(try Poll.waitReadable(pending.ended, timeoutMilliseconds: 0))
        #expect(pending.wait() == .success("first"))
    }

    @Test func blockingWorkRunsOnAThreadOfItsOwn() async throws {
        let name = try await OSThread.run(name: "blocking-work") { () throws(SwiftletError) -> String in
            try OwnedFileDescriptor.readSmallTextFile("/proc/thread-self/comm")
        }
        #expect(name == "blocking-work\n")
        await #expect(throws: SwiftletError(.unsupported, "no")) {
            try await OSThread.run(name: "failing") { () throws(SwiftletError) -> Int in throw SwiftletError(.unsupported, "no") }
        }
    }

    @Test func littleEndianAppendsWritesAndReads() {
        var bytes: [UInt8] = [0xAA]
        LittleEndian.append(0x0102_0304, 4, to: &bytes)
        LittleEndian.append(0xFFFF_FFFF_FFFF_FFFF, 2, to: &bytes)
        #expect(bytes == [0xAA, 4, 3, 2, 1, 0xFF, 0xFF])
        LittleEndian.write(0xBEEF, 2, into: &bytes, at: 1)
        #expect(bytes == [0xAA, 0xEF, 0xBE, 2, 1, 0xFF, 0xFF])
        #expect(LittleEndian.read(bytes, at: 1, count: 4) == 0x0102_BEEF)
        #expect(LittleEndian.bytes(0x0102, 3) == [2, 1, 0])
    }
}
