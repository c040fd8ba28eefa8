import CLinux
import Glibc
@testable import SwiftletKit
import SwiftletNet
import SwiftletSystem
import Testing

/// passt as a machine's network: real frames on its socket, real ports on the host. Needs
/// /usr/bin/passt (scripts/setup installs it); no KVM.
@Suite(.serialized) struct PasstTests {
    static let network = GuestNetwork.default
    static let childVariable = "SWIFTLET_TEST_PASST_PID_FILE"

    // MARK: frames

    static func frame(to destination: [UInt8], type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        destination + network.guestMAC.bytes + be16(type) + payload
    }

    static func be16(_ value: UInt16) -> [UInt8] { [UInt8(value >> 8), UInt8(truncatingIfNeeded: value)] }
    static func be32(_ value: UInt32) -> [UInt8] { be16(UInt16(value >> 16)) + be16(UInt16(truncatingIfNeeded: value)) }

    /// "Who has `target`?" from the guest.
    static func arpRequest(for target: IPAddress) -> [UInt8] {
        let arp = be16(1) + be16(0x0800) + [6, 4] + be16(1) + network.guestMAC.bytes + network.guestAddress.bytes
            + [0, 0, 0, 0, 0, 0] + target.bytes
        return frame(to: [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], type: 0x0806, arp)
    }

    /// A TCP SYN from the guest's `sourcePort` to `destination:port`.
    static func tcpSYN(to destination: IPAddress, port: UInt16, from sourcePort: UInt16) -> [UInt8] {
        var tcp = be16(sourcePort) + be16(port) + be32(0x1234_5678) + be32(0)
            + [0x60, 0x02] + be16(65535) + [0, 0, 0, 0]  // 24-byte header (with MSS), SYN
            + [2, 4] + be16(1460)
        var checksum = InternetChecksum()
        checksum.addPseudoHeader(source: network.guestAddress, destination: destination, protocol: 6, length: tcp.count)
        checksum.add(tcp)
        let value = checksum.value
        tcp[16] = UInt8(value >> 8); tcp[17] = UInt8(truncatingIfNeeded: value)
        return frame(to: network.gatewayMAC.bytes, type: 0x0800, ipv4(to: destination, protocol: 6, tcp))
    }

    static func ipv4(to destination: IPAddress, protocol transport: UInt8, _ payload: [UInt8]) -> [UInt8] {
        var header = [0x45, 0] + be16(UInt16(20 + payload.count)) + be16(1) + [0x40, 0] + [64, transport] + [0, 0]
            + network.guestAddress.bytes + destination.bytes
        let checksum = InternetChecksum.of(header)
        header[10] = UInt8(checksum >> 8); header[11] = UInt8(truncatingIfNeeded: checksum)
        return header + payload
    }

    static func send(_ frame: [UInt8], on socket: borrowing OwnedFileDescriptor) throws {
        let fd = socket.rawValue
        try (be32(UInt32(frame.count)) + frame).withUnsafeBytes { bytes in try OwnedFileDescriptor.writeAll(fd: fd, bytes) }
    }

    /// Reads frames from passt until `match` accepts one or `milliseconds` pass.
    static func receive(on socket: borrowing OwnedFileDescriptor, milliseconds: Int = 5000, until match: ([UInt8]) -> Bool) throws -> [UInt8]? {
        let deadline = MonotonicClock.now + UInt64(milliseconds) * 1_000_000
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536 + 4)
        while true {
            while pending.count >= 4 {
                let length = Int(pending[0]) << 24 | Int(pending[1]) << 16 | Int(pending[2]) << 8 | Int(pending[3])
                guard pending.count >= 4 + length else { break }
                let frame = Array(pending[4..<(4 + length)])
                pending.removeFirst(4 + length)
                if match(frame) { return frame }
            }
            guard try Poll.wait([socket.rawValue], deadline: deadline)[0] else { return nil }
            let n = chunk.withUnsafeMutableBytes { read(socket.rawValue, $0.baseAddress, $0.count) }
            guard n > 0 else { return nil }
            pending += chunk[0..<n]
        }
    }

    // MARK: host sockets

    /// A listening TCP socket on 127.0.0.1 at a port the kernel picks (the caller closes it), and that port.
    static func listener() throws -> (Int32, UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0, sin_addr: in_addr(s_addr: UInt32(0x7F00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        try #require(withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0)
        try #require(listen(fd, 8) == 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        try #require(withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } } == 0)
        return (fd, UInt16(bigEndian: address.sin_port))
    }

    /// A port on 127.0.0.1 free a moment ago.
    static func freePort() throws -> UInt16 {
        let (socket, port) = try listener()
        close(socket)
        return port
    }

    /// Connects to 127.0.0.1:`port`; true if the connection was accepted.
    static func connects(to port: UInt16) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: port.bigEndian, sin_addr: in_addr(s_addr: UInt32(0x7F00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        return withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
    }

    static func command(of pid: Int32) -> String? {
        (try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/comm")).map { String($0.filter { $0 != "\n" }) }
    }

    static func isGone(_ pid: Int32, seconds: Int = 10) -> Bool {
        let deadline = MonotonicClock.now + UInt64(seconds) * 1_000_000_000
        while MonotonicClock.now < deadline {
            guard let stat = try? OwnedFileDescriptor.readSmallTextFile("/proc/\(pid)/stat"), stat.contains("(passt") else { return true }
            if let close = stat.lastIndex(of: ")"), stat[stat.index(after: close)...].hasPrefix(" Z") { return true }
            usleep(10_000)
        }
        return false
    }

    static func temporaryDirectory() throws -> String {
        var template = Array("/tmp/swiftlet-passt-test.XXXXXX".utf8CString)
        try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) } != nil)
        return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    // MARK: tests

    @Test func theArgumentsTellPasstTheGuestsAddresses() {
        let configuration = NetworkConfiguration(published: [
            PortPublication(hostPort: 8080, guestPort: 80),
            PortPublication(hostAddress: .v6(0, 1), hostPort: 5353, guestPort: 53, transport: .udp),
        ])
        #expect(PasstProcess.arguments(network: .default, configuration: configuration, logFile: "/m/passt.log") == [
            "--foreground", "--quiet", "--fd", "3", "--log-file", "/m/passt.log", "--log-size", "1048576",
            "--mtu", "65520", "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2",
            "--mac-addr", "02:53:57:00:00:02", "--dns-forward", "10.0.2.3",
            "--no-dhcp", "--no-dhcp-dns", "--no-dhcp-search",
            "--tcp-ports", "127.0.0.1/8080:80", "--udp-ports", "::1/5353:53",
        ])
    }

    /// Debian's /usr/bin/passt only executes passt.avx2 on a CPU with AVX2: Swiftlet executes it
    /// itself then, and the CPU check agrees with the kernel's (which lists avx2 only when usable).
    @Test func passtsAVX2BuildRunsWhereTheCPUHasAVX2() throws {
        let cpuinfo = try OwnedFileDescriptor.readSmallTextFile("/proc/cpuinfo", limit: 1 << 22)
        let flags = try #require(cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") })
        let avx2 = flags.split(separator: " ").contains("avx2")
        #expect((swiftlet_host_has_avx2() == 1) == avx2)
        let program = avx2 && access("/usr/bin/passt.avx2", X_OK) == 0 ? "/usr/bin/passt.avx2" : "/usr/bin/passt"
        #expect(PasstProcess.defaultProgram == program)
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        defer { started.process.stop() }
        var buffer = [CChar](repeating: 0, count: 256)
        let count = readlink("/proc/\(started.process.pid)/exe", &buffer, buffer.count - 1)
        #expect(count > 0 && String(cString: buffer) == program)
    }

    @Test func passtAnswersARPForTheGatewayWithItsMAC() throws {
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        let passt = started.process, socket = started.socket
        defer { passt.stop() }
        try Self.send(Self.arpRequest(for: Self.network.gateway), on: socket)
        let reply = try #require(try Self.receive(on: socket) { $0.count >= 42 && $0[12] == 0x08 && $0[13] == 0x06 })
        #expect(Array(reply[0..<6]) == Self.network.guestMAC.bytes)
        #expect(Array(reply[20..<22]) == [0, 2], "an ARP reply")
        #expect(Array(reply[22..<28]) == Self.network.gatewayMAC.bytes)
        #expect(Array(reply[28..<32]) == Self.network.gateway.bytes)
    }

    @Test func aConnectionToTheGatewayReachesTheHostsLoopback() throws {
        let (listener, port) = try Self.listener()
        defer { close(listener) }
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        let passt = started.process, socket = started.socket
        defer { passt.stop() }
        try Self.send(Self.tcpSYN(to: Self.network.gateway, port: port, from: 40000), on: socket)
        // passt connects to 127.0.0.1:port, and answers the guest with a SYN-ACK from the gateway.
        #expect(try Poll.waitReadable(listener, timeoutMilliseconds: 5000))
        let accepted = accept(listener, nil, nil)
        #expect(accepted >= 0)
        if accepted >= 0 { close(accepted) }
        let synAck = try Self.receive(on: socket) { frame in
            frame.count >= 54 && frame[12] == 0x08 && frame[13] == 0x00 && frame[23] == 6
                && Array(frame[26..<30]) == Self.network.gateway.bytes && frame[47] & 0x12 == 0x12
        }
        #expect(synAck != nil)
    }

    @Test func aPublishedPortIsBoundOnTheHostAndReachesTheGuest() throws {
        let port = try Self.freePort()
        let configuration = NetworkConfiguration(published: [PortPublication(hostPort: port, guestPort: 80)])
        let started = try PasstProcess.start(configuration: configuration, logFile: nil)
        let passt = started.process, socket = started.socket
        defer { passt.stop() }
        // start returns with the port bound: no wait.
        #expect(Self.connects(to: port))
        let syn = try Self.receive(on: socket) { frame in
            frame.count >= 54 && frame[12] == 0x08 && frame[13] == 0x00 && frame[23] == 6
                && Array(frame[30..<34]) == Self.network.guestAddress.bytes && Array(frame[36..<38]) == [0, 80] && frame[47] & 0x02 != 0
        }
        #expect(syn != nil, "passt sends the guest a SYN to port 80")
    }

    @Test func aPublishedPortInUseIsAnErrorNamingIt() throws {
        let (listener, port) = try Self.listener()
        defer { close(listener) }
        let directory = try Self.temporaryDirectory()
        let configuration = NetworkConfiguration(published: [PortPublication(hostPort: port, guestPort: 80)])
        #expect {
            _ = try PasstProcess.start(configuration: configuration, logFile: directory + "/passt.log")
        } throws: {
            let error = $0 as! SwiftletError
            return error.code == .invalidArgument && error.message.contains("127.0.0.1:\(port) (tcp)") && error.message.contains("-p")
        }
        // The same without a log file (passt's log in memory).
        #expect {
            _ = try PasstProcess.start(configuration: configuration, logFile: nil)
        } throws: { ($0 as! SwiftletError).message.contains("127.0.0.1:\(port) (tcp)") }
    }

    @Test func passtEndingAtStartIsAnErrorWithItsLastWords() throws {
        var network = GuestNetwork.default
        network.mtu = 70000
        #expect {
            _ = try PasstProcess.start(network: network, configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        } throws: {
            let error = $0 as! SwiftletError
            return error.message.hasPrefix("passt exited with status 1 at start: ") && error.message.contains("MTU")
        }
    }

    @Test func stopKillsAndReapsPasst() throws {
        let directory = try Self.temporaryDirectory()
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: directory + "/passt.log")
        let passt = started.process
        let pid = passt.pid
        #expect(Self.command(of: pid)?.hasPrefix("passt") == true)
        var info = stat()
        #expect(stat(directory + "/passt.log", &info) == 0 && info.st_mode & 0o777 == 0o600)
        passt.stop()
        #expect(passt.exit == .signaled(SIGKILL))
        #expect(Self.command(of: pid)?.hasPrefix("passt") != true)
        passt.stop()
    }

    @Test func passtEndsWhenItsSocketIsShutDown() throws {
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        let passt = started.process
        UnixSocket.shutdown(started.socket.rawValue, .both)
        // What ends a passt that dropped to nobody (no death signal left, and no signal from a
        // confined VMM reaches it): `stop` shuts the socket down, and a VMM that dies closes it.
        #expect(Self.isGone(passt.pid))
        for _ in 0..<500 where passt.exit == nil { usleep(10_000) }  // reaped by its thread a moment later
        #expect(passt.exit != nil && passt.exit != .signaled(SIGKILL), "passt ended by itself: \(String(describing: passt.exit))")
    }

    @Test func aMissingPasstIsAClearError() {
        #expect {
            _ = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil, executable: "/nonexistent/passt")
        } throws: {
            let error = $0 as! SwiftletError
            return error.code == .notFound && error.message.contains("/nonexistent/passt")
        }
    }

    /// Run as a child (with `childVariable` set): starts passt, writes its pid, waits to be killed.
    @Test func childThatStartsPasstAndWaits() throws {
        guard let path = getenv(Self.childVariable).map({ String(cString: $0) }) else { return }
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        let passt = started.process, socket = started.socket
        try OwnedFileDescriptor.writeSmallFileAtomically(path, Array("\(passt.pid)\n".utf8))
        // Both stay alive (the process object stops passt when it goes, and passt ends when the socket closes).
        while true { pause(); _ = passt.pid; _ = socket.rawValue }
    }

    /// Runs this test bundle as a child with only the test `name`, `childVariable` set to a file
    /// that test writes; returns the child and the file's first line (nil if none came in 60 s).
    static func runChildTest(_ name: String) throws -> (child: HelperProcess, line: String?) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        try #require(n > 0)
        let directory = try Self.temporaryDirectory()
        var environment: [String] = []
        var entry = environ
        while let pointer = entry.pointee { environment.append(String(cString: pointer)); entry += 1 }
        environment.append("\(Self.childVariable)=\(directory)/out")
        let null = try OwnedFileDescriptor.open("/dev/null", flags: O_RDWR)
        let child = try HelperProcess.start(String(decoding: buffer[0..<n], as: UTF8.self),
                                            arguments: ["--testing-library", "swift-testing", "--filter", name],
                                            environment: environment, descriptors: [null.rawValue, null.rawValue, null.rawValue], name: "test-child")
        let deadline = MonotonicClock.now + 60_000_000_000
        while MonotonicClock.now < deadline {
            if let text = try? OwnedFileDescriptor.readSmallTextFile(directory + "/out") {
                return (child, text.split(separator: "\n").first.map(String.init))
            }
            if child.exit != nil { break }
            usleep(20_000)
        }
        return (child, nil)
    }

    /// Run as a child: starts passt, confines itself as a VMM does, then stops passt: the VMM's
    /// seccomp filter lets it kill and reap passt (a refused call would end it with status 159).
    @Test func childThatStopsPasstWhenConfined() throws {
        guard let path = getenv(Self.childVariable).map({ String(cString: $0) }) else { return }
        let started = try PasstProcess.start(configuration: NetworkConfiguration(allowAll: true), logFile: nil)
        let passt = started.process, socket = started.socket
        try Confinement.confine(.vmm)
        passt.stop()
        let exit = passt.exit.map { "\($0)" } ?? "running"
        _ = socket.rawValue
        try OwnedFileDescriptor.writeSmallFileAtomically(path, Array("\(exit)\n".utf8))
        Glibc._exit(0)
    }

    /// As root, passt runs as `nobody`, which the confined process (no CAP_KILL) cannot signal:
    /// it ends because `stop` shuts its socket down (before that was done, this child hung,
    /// waiting for a passt its SIGKILL never reached). Not as root, the SIGKILL reaches it.
    @Test func aConfinedVMMStopsAndReapsPasst() throws {
        let (child, line) = try Self.runChildTest("childThatStopsPasstWhenConfined")
        defer { child.stop() }
        #expect(line != nil && line != "running", "\(line ?? "no answer from the child within 60 s")")
        if getuid() != 0 { #expect(line == "killed by signal 9") }
        #expect(child.waitForExit(timeoutNanoseconds: 30_000_000_000) == .exited(0))
    }

    @Test func passtDiesWithTheProcessThatStartedIt() throws {
        let (child, line) = try Self.runChildTest("childThatStartsPasstAndWaits")
        defer { child.stop() }
        let passt = try #require(line.flatMap { Int32($0) })
        #expect(Self.command(of: passt)?.hasPrefix("passt") == true)
        #expect(child.stop() == .signaled(SIGKILL))
        #expect(Self.isGone(passt))
    }
}
