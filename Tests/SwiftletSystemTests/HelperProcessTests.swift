import CLinux
import Glibc
import SwiftletSystem
import Testing

/// Helper processes: only the descriptors given, stopped and reaped, a clear error for a missing
/// program, and gone with the process that started them (kill -9 included).
@Suite struct HelperProcessTests {
    /// Set in the environment of the test bundle run as a child by `aHelperDiesWithTheProcessThatStartedIt`.
    static let childVariable = "SWIFTLET_TEST_HELPER_PID_FILE"

    static func devNull() throws -> OwnedFileDescriptor {
        try OwnedFileDescriptor.open("/dev/null", flags: O_RDWR)
    }

    /// The descriptor numbers the process `pid` has open.
    static func descriptors(of pid: Int32) -> [Int32] {
        (OwnedFileDescriptor.directoryEntries("/proc/\(pid)/fd") ?? []).compactMap { Int32($0.name) }.sorted()
    }

    /// /proc/PID/stat's state letter and command, nil once the process is gone.
    static func state(of pid: Int32) -> (state: Character, command: String)? {
        guard let stat = try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/stat"),
              let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { return nil }
        let command = String(stat[stat.index(after: open)..<close])
        let rest = stat[stat.index(after: close)...].drop(while: { $0 == " " })
        return rest.first.map { ($0, command) }
    }

    /// Waits until `pid` (running `command`) is gone or a zombie nobody reaps; false on timeout.
    static func waitUntilGone(_ pid: Int32, command: String, seconds: Int = 10) -> Bool {
        let deadline = MonotonicClock.now + UInt64(seconds) * 1_000_000_000
        while MonotonicClock.now < deadline {
            guard let state = state(of: pid), state.command == command else { return true }
            if state.state == "Z" { return true }
            usleep(10_000)
        }
        return false
    }

    @Test func theChildHasOnlyTheDescriptorsItWasGiven() throws {
        let null = try Self.devNull()
        let pair = try UnixSocket.pair()
        // Descriptors the child must not get, close-on-exec or not.
        let inheritable = dup(null.rawValue)
        defer { close(inheritable) }
        let helper = try HelperProcess.start("/bin/sleep", arguments: ["30"],
                                             descriptors: [null.rawValue, null.rawValue, null.rawValue, pair.second.rawValue], name: "sleep")
        defer { helper.stop() }
        // start returns once the child has executed sleep.
        #expect(Self.state(of: helper.pid)?.command == "sleep")
        // (While sleep's dynamic loader runs, it has libraries open for a moment: wait that out.
        // On a loaded host a file of sleep's own may still be open when the wait ends: what must
        // never be there is one of this process's kinds, a pipe, a socket or /dev/null, beyond 0-3.)
        let deadline = MonotonicClock.now + 10_000_000_000
        while Self.descriptors(of: helper.pid) != [0, 1, 2, 3] && MonotonicClock.now < deadline { usleep(10_000) }
        let descriptors = Self.descriptors(of: helper.pid)
        #expect(Array(descriptors.prefix(4)) == [0, 1, 2, 3])
        for fd in descriptors.dropFirst(4) {
            var target = [CChar](repeating: 0, count: 256)
            guard readlink("/proc/\(helper.pid)/fd/\(fd)", &target, target.count - 1) > 0 else { continue } // closed meanwhile
            let name = String(cString: target)
            #expect(!name.hasPrefix("socket:") && !name.hasPrefix("pipe:") && name != "/dev/null",
                    "the child holds descriptor \(fd) (\(name)) it was not given")
        }
        var buffer = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/\(helper.pid)/fd/3", &buffer, buffer.count - 1)
        #expect(n > 0 && String(cString: buffer).hasPrefix("socket:"))
        #expect(helper.exit == nil)
    }

    @Test func stopKillsAndReapsAndCanBeRepeated() throws {
        let null = try Self.devNull()
        let helper = try HelperProcess.start("/bin/sleep", arguments: ["30"], descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "sleep")
        #expect(helper.stop() == .signaled(SIGKILL))
        #expect(helper.exit == .signaled(SIGKILL))
        #expect(Self.state(of: helper.pid)?.command != "sleep")
        #expect(helper.stop() == .signaled(SIGKILL))
    }

    @Test func anExitStatusIsReported() throws {
        let null = try Self.devNull()
        let helper = try HelperProcess.start("/bin/sh", arguments: ["-c", "exit 3"], descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "sh")
        #expect(helper.waitForExit(timeoutNanoseconds: 10_000_000_000) == .exited(3))
    }

    @Test func signalsAreUnblockedAndAtTheirDefaultsInTheChild() throws {
        // The test runner may ignore or block signals; the child starts clean.
        let null = try Self.devNull()
        let helper = try HelperProcess.start("/bin/sleep", arguments: ["30"], descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "sleep")
        defer { helper.stop() }
        let status = try OwnedFileDescriptor.readSmallTextFile("/proc/\(helper.pid)/status")
        let fields = Dictionary(status.split(separator: "\n").compactMap { line -> (String, String)? in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters())
        }, uniquingKeysWith: { a, _ in a })
        #expect(fields["SigBlk"] == "0000000000000000")
        // Signals 32 and 33 are the C library's own (NPTL): their dispositions are not ours to
        // reset, and a parent started by make may pass one on ignored.
        let ignored = UInt64(fields["SigIgn"] ?? "", radix: 16)
        #expect(ignored.map { $0 & ~(UInt64(3) << 31) } == 0, "SigIgn \(fields["SigIgn"] ?? "?")")
    }

    @Test func aMissingProgramIsAClearError() throws {
        let null = try Self.devNull()
        #expect {
            try HelperProcess.start("/nonexistent/helper", arguments: [], descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "helper")
        } throws: {
            let error = $0 as! SwiftletError
            return error.code == .notFound && error.message.contains("/nonexistent/helper")
        }
    }

    /// Run as a child (with `childVariable` set): starts a `sleep` helper, writes its pid, and waits to be killed.
    @Test func childThatStartsAHelperAndWaits() throws {
        guard let path = getenv(Self.childVariable).map({ String(cString: $0) }) else { return }
        let null = try Self.devNull()
        let helper = try HelperProcess.start("/bin/sleep", arguments: ["1000"], descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "sleep")
        try OwnedFileDescriptor.writeSmallFileAtomically(path, Array("\(helper.pid)\n".utf8))
        while true { pause() }
    }

    @Test func aHelperDiesWithTheProcessThatStartedIt() throws {
        let child = try Self.runChildTest("childThatStartsAHelperAndWaits", variable: Self.childVariable)
        defer { child.process.stop() }
        let pid = try #require(child.helperPID)
        #expect(Self.state(of: pid)?.command == "sleep")
        // kill -9 the process that started it: its waiting thread goes, so PR_SET_PDEATHSIG fires.
        #expect(child.process.stop() == .signaled(SIGKILL))
        #expect(Self.waitUntilGone(pid, command: "sleep"))
    }

    /// Runs this test bundle as a child with only the test `name` and `variable` set to a file
    /// where that test writes a pid; returns the child and that pid (nil if none came in 60 s).
    static func runChildTest(_ name: String, variable: String) throws -> (process: HelperProcess, helperPID: Int32?) {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        #expect(n > 0)
        let bundle = String(cString: buffer)
        let directory = try makeTemporaryDirectory()
        let pidFile = directory + "/pid"
        var environment: [String] = []
        var entry = environ
        while let pointer = entry.pointee { environment.append(String(cString: pointer)); entry += 1 }
        environment.append("\(variable)=\(pidFile)")
        let null = try devNull()
        let process = try HelperProcess.start(bundle, arguments: ["--testing-library", "swift-testing", "--filter", name],
                                              environment: environment,
                                              descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "test-child")
        let deadline = MonotonicClock.now + 60_000_000_000
        while MonotonicClock.now < deadline && process.exit == nil {
            if let text = try? OwnedFileDescriptor.readSmallTextFile(pidFile), let pid = Int32(text.trimmingCharacters()) {
                return (process, pid)
            }
            usleep(20_000)
        }
        return (process, nil)
    }

    static func makeTemporaryDirectory() throws -> String {
        var template = Array("/tmp/swiftlet-helper-test.XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        try #require(made != nil)
        return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}

extension StringProtocol {
    fileprivate func trimmingCharacters() -> String {
        String(drop(while: { $0.isWhitespace }).reversed().drop(while: { $0.isWhitespace }).reversed())
    }
}
