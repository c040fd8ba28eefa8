import Testing
@testable import AgentProtocol

@Suite struct AgentProtocolTests {
    static let samples: [AgentMessage] = [
        .ready(version: 1), .started(pid: 42), .stdout([1, 2, 3]), .stderr([]), .exited(status: 130),
        .failed(status: 127, message: "nosuch: command not found"),
        .exec(ExecRequest(arguments: ["sh", "-c", "echo ü"], environment: ["A=1", "PATH=/bin"], workingDirectory: "/tmp",
                          user: "1000:1000", terminal: true, rows: 50, columns: 132)),
        .stdin(Array(repeating: 0xFF, count: 70_000)), .closeStdin, .signal(2), .resize(rows: 10, columns: 20), .openSession,
        .identity(hostname: "clone-1", seed: Array(0..<32)),
        .mountRoot(devices: ["/dev/vda", "/dev/vdb"]), .mountRoot(devices: []), .rootMounted,
        .agentKey(Array(0..<32)), .challenge(nonce: Array(32..<64)), .proof(Array(64..<96)),
    ]

    @Test(arguments: samples)
    func everyMessageRoundTrips(message: AgentMessage) throws {
        let frame = AgentFrame.encode(message)
        var reader = AgentFrameReader()
        reader.append(frame)
        #expect(try reader.next() == message)
        #expect(try reader.next() == nil)
    }

    @Test func aStreamSplitAnywhereYieldsTheSameMessages() throws {
        let stream = Self.samples.flatMap(AgentFrame.encode)
        for chunk in [1, 3, 7, 4096] {
            var reader = AgentFrameReader()
            var got: [AgentMessage] = []
            var at = 0
            while at < stream.count {
                reader.append(stream[at..<min(at + chunk, stream.count)])
                at += chunk
                while let m = try reader.next() { got.append(m) }
            }
            #expect(got == Self.samples, "chunk size \(chunk)")
        }
    }

    @Test func malformedFramesAreErrors() throws {
        func decode(_ bytes: [UInt8]) throws(AgentProtocolError) -> AgentMessage? {
            var reader = AgentFrameReader()
            reader.append(bytes)
            return try reader.next()
        }
        #expect(throws: AgentProtocolError.self) { try decode([0, 0, 0, 0]) }                  // empty frame
        #expect(throws: AgentProtocolError.self) { try decode([0, 0, 0x20, 0, 1]) }            // 2 MiB frame
        #expect(throws: AgentProtocolError.self) { try decode([1, 0, 0, 0, 99]) }              // unknown tag
        #expect(throws: AgentProtocolError.self) { try decode([2, 0, 0, 0, 5, 1]) }            // truncated status
        #expect(throws: AgentProtocolError.self) { try decode([6, 0, 0, 0, 5, 1, 0, 0, 0, 9]) } // trailing byte
        #expect(throws: AgentProtocolError.self) { try decode([11, 0, 0, 0, 6, 0, 0, 0, 0, 2, 0, 0, 0, 0xC3, 0x28]) } // not UTF-8
        #expect(try decode([5, 0, 0, 0, 3, 9]) == nil, "incomplete: wait for more")
    }
}
