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
        .configureNetwork(Self.setup), .configureNetwork(NetworkSetup(address: "192.168.1.2", prefixLength: 31, gateway: "192.168.1.3",
                                                                        dns: [], mtu: 68, hostName: "", mac: [0xFE, 0, 0, 0, 0, 0])),
        .networkConfigured,
    ]

    static let setup = NetworkSetup(address: "10.0.2.15", prefixLength: 24, gateway: "10.0.2.2", dns: ["10.0.2.3", "fd00::3"],
                                    mtu: 65520, hostName: "host.swiftlet.internal", mac: [0x02, 0x53, 0x57, 0, 0, 1])

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

    /// Every field of `configureNetwork` is checked as it is decoded: the agent writes the
    /// strings into /etc files and hands the numbers to the kernel.
    @Test(arguments: [
        ("address", "10.0.2"), ("address", "10.0.2.256"), ("address", "10.0.02.15"), ("address", ""),
        ("address", "10.0.2.15 "), ("address", "fd00::15"), ("gateway", "10.0.3.2"), ("gateway", "10.0.2.15"),
        ("gateway", "10.0.2.2\nnameserver 1.1.1.1"), ("hostName", "host swiftlet"), ("hostName", "-host"), ("hostName", "a..b"),
        ("hostName", "host.\n10.0.0.1 evil"), ("hostName", String(repeating: "a", count: 64)),
        ("hostName", Array(repeating: "abc", count: 64).joined(separator: ".")),
    ])
    func malformedNetworkSetupsAreProtocolErrors(field: String, value: String) throws {
        var setup = Self.setup
        switch field {
        case "address": setup.address = value
        case "gateway": setup.gateway = value
        default: setup.hostName = value
        }
        try expectRejected(setup)
    }

    @Test func networkSetupNumbersListsAndMACsAreChecked() throws {
        try Self.setup.validate()
        for change in [{ (s: inout NetworkSetup) in s.prefixLength = 0 }, { $0.prefixLength = 32 }, { $0.prefixLength = 200 },
                       { $0.mtu = 67 }, { $0.mtu = 65536 }, { $0.mtu = .max },
                       { $0.mac = [2, 0, 0, 0, 0] }, { $0.mac = [2, 0, 0, 0, 0, 0, 0] }, { $0.mac = [1, 0, 0, 0, 0, 0] },
                       { $0.mac = [0, 0, 0, 0, 0, 0] }, { $0.mac = [] },
                       { $0.dns = ["10.0.2.3", "10.0.2.4", "10.0.2.5", "10.0.2.6"] }, { $0.dns = ["dns.example"] },
                       { $0.dns = ["::1\nsearch evil"] }, { $0.dns = [":"] }, { $0.dns = [""] },
                       { $0.dns = [String(repeating: ":", count: 46)] }] as [(inout NetworkSetup) -> Void] {
            var setup = Self.setup
            change(&setup)
            try expectRejected(setup)
        }
        #expect(Self.setup.macText == "02:53:57:00:00:01")
        var upper = Self.setup
        upper.mac = [0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF]
        #expect(upper.macText == "aa:bb:cc:dd:ee:ff")
    }

    /// `setup` encodes (encoding does not check) but does not decode.
    func expectRejected(_ setup: NetworkSetup, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(throws: AgentProtocolError.self, "\(setup)", sourceLocation: sourceLocation) { try setup.validate() }
        var reader = AgentFrameReader()
        reader.append(AgentFrame.encode(.configureNetwork(setup)))
        #expect(throws: AgentProtocolError.self, "\(setup)", sourceLocation: sourceLocation) { try reader.next() }
    }

    @Test func aTruncatedNetworkSetupIsAnError() throws {
        let frame = AgentFrame.encode(.configureNetwork(Self.setup))
        let body = Array(frame.dropFirst(4))
        for cut in 1..<body.count {
            #expect(throws: AgentProtocolError.self, "cut at \(cut)") { try AgentFrame.decode(body[0..<cut]) }
        }
        #expect(throws: AgentProtocolError.self) { try AgentFrame.decode((body + [0])[...]) }
    }
}
