import FoundationEssentials
import AgentProtocol
@testable import SwiftletKit

/// Agent frames as the host reads them from a guest (and the agent from the host): the input is
/// the byte stream, handed to the reader in chunks whose sizes come from its first byte. Every
/// message that decodes must encode back to a frame that decodes to the same message.
enum AgentFrameFuzz {
    static func run(_ bytes: [UInt8]) {
        var input = FuzzInput(bytes)
        let chunk = Int(input.byte()) + 1
        let stream = input.rest()
        var reader = AgentFrameReader()
        var offset = 0
        reading: while offset < stream.count {
            reader.append(stream[offset..<min(stream.count, offset + chunk)])
            offset += chunk
            while true {
                let message: AgentMessage?
                do { message = try reader.next() } catch { break reading }
                guard let message else { break }
                let frame = AgentFrame.encode(message)
                var again = AgentFrameReader()
                again.append(frame)
                precondition((try? again.next()) == message, "an agent message does not survive encoding: \(message)")
            }
        }
    }

    static func seeds() -> [[UInt8]] {
        let messages: [AgentMessage] = [
            .ready(version: AgentMessage.version), .started(pid: 42), .stdout(Array("hello\n".utf8)), .stderr([0xFF, 0]), .exited(status: 3),
            .failed(status: 127, message: "no such file"), .rootMounted, .openSession, .identity(hostname: "box", seed: [1, 2, 3]),
            .mountRoot(devices: ["/dev/vda", "/dev/vdb"]), .exec(ExecRequest(arguments: ["/bin/sh", "-c", "echo hi"], environment: ["A=b"], terminal: true, rows: 24, columns: 80)),
            .stdin(Array("input".utf8)), .closeStdin, .signal(15), .resize(rows: 50, columns: 132),
            .configureNetwork(NetworkSetup(address: "10.0.2.15", prefixLength: 24, gateway: "10.0.2.2", dns: ["10.0.2.3"], mtu: 65520,
                                           hostName: "host.swiftlet.internal", mac: [0x02, 0x53, 0x57, 0, 0, 1])),
            .networkConfigured,
        ]
        return [[0xFF] + messages.flatMap(AgentFrame.encode), [3] + messages.prefix(4).flatMap(AgentFrame.encode)]
            + messages.map { [0xFF] + AgentFrame.encode($0) }
    }
}

/// The control socket's JSON lines (requests, exec control, replies): decoded as the VMM process
/// and the CLI decode them; whatever decodes must encode and decode again.
enum ControlJSONFuzz {
    static func run(_ bytes: [UInt8]) {
        let line = Data(bytes)
        if let request = try? JSONDecoder().decode(ControlRequest.self, from: line) {
            let again = try? JSONDecoder().decode(ControlRequest.self, from: JSONEncoder().encode(request))
            precondition(again?.operation == request.operation, "a control request does not survive encoding")
        }
        if let control = try? JSONDecoder().decode(ExecControl.self, from: line) {
            precondition((try? JSONDecoder().decode(ExecControl.self, from: JSONEncoder().encode(control)))?.signal == control.signal,
                         "an exec control message does not survive encoding")
        }
        if let reply = try? JSONDecoder().decode(ControlReply.self, from: line) {
            precondition((try? JSONDecoder().decode(ControlReply.self, from: JSONEncoder().encode(reply)))?.error == reply.error,
                         "a control reply does not survive encoding")
        }
    }

    static func seeds() throws -> [[UInt8]] {
        var exec = ControlRequest(.exec)
        exec.arguments = ["/bin/sh", "-c", "ls"]; exec.environment = ["TERM=xterm"]; exec.workingDirectory = "/"
        exec.terminal = true; exec.rows = 24; exec.columns = 80; exec.input = true
        var stop = ControlRequest(.stop)
        stop.timeoutMilliseconds = 5000
        var snapshot = ControlRequest(.snapshot)
        snapshot.path = "/tmp/snap"; snapshot.diff = true
        var status = ControlReply()
        status.state = "running"; status.pid = 1234; status.cpus = 2; status.memoryMiB = 512; status.uptimeMilliseconds = 99
        let encoder = JSONEncoder()
        return try [exec, stop, snapshot, ControlRequest(.status)].map { Array(try encoder.encode($0)) }
            + [Array(try encoder.encode(ExecControl(signal: 2, rows: 30, columns: 100))), Array(try encoder.encode(status)),
               Array(try encoder.encode(ControlReply.failed("no such machine")))]
    }
}
