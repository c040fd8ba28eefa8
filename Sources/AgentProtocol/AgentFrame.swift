/// Frames: a 4-byte little-endian length (of what follows), a 1-byte message tag, then the fields.
/// Integers are little-endian; byte strings and strings are a 4-byte length and the bytes; lists
/// are a 4-byte count and the items.
public enum AgentFrame {
    /// Frames larger than this are a protocol error (output is sent in chunks well below it).
    public static let maximumLength = 1 << 20

    enum Tag: UInt8 {
        case ready = 1, started, stdout, stderr, exited, failed, rootMounted, proof, networkConfigured
        case exec = 32, stdin, closeStdin, signal, resize, openSession, identity, mountRoot, agentKey, challenge, configureNetwork
    }

    public static func encode(_ message: AgentMessage) -> [UInt8] {
        var w = Writer()
        switch message {
        case .ready(let version): w.tag(.ready); w.u32(version)
        case .started(let pid): w.tag(.started); w.u32(UInt32(bitPattern: pid))
        case .stdout(let bytes): w.tag(.stdout); w.bytes(bytes)
        case .stderr(let bytes): w.tag(.stderr); w.bytes(bytes)
        case .exited(let status): w.tag(.exited); w.u32(UInt32(bitPattern: status))
        case .failed(let status, let text): w.tag(.failed); w.u32(UInt32(bitPattern: status)); w.string(text)
        case .exec(let r):
            w.tag(.exec)
            w.strings(r.arguments); w.strings(r.environment); w.string(r.workingDirectory); w.string(r.user)
            w.u8(r.terminal ? 1 : 0); w.u16(r.rows); w.u16(r.columns)
        case .stdin(let bytes): w.tag(.stdin); w.bytes(bytes)
        case .closeStdin: w.tag(.closeStdin)
        case .signal(let number): w.tag(.signal); w.u32(UInt32(bitPattern: number))
        case .resize(let rows, let columns): w.tag(.resize); w.u16(rows); w.u16(columns)
        case .openSession: w.tag(.openSession)
        case .identity(let hostname, let seed): w.tag(.identity); w.string(hostname); w.bytes(seed)
        case .rootMounted: w.tag(.rootMounted)
        case .mountRoot(let devices): w.tag(.mountRoot); w.strings(devices)
        case .proof(let bytes): w.tag(.proof); w.bytes(bytes)
        case .agentKey(let bytes): w.tag(.agentKey); w.bytes(bytes)
        case .challenge(let nonce): w.tag(.challenge); w.bytes(nonce)
        case .networkConfigured: w.tag(.networkConfigured)
        case .configureNetwork(let setup):
            w.tag(.configureNetwork)
            w.string(setup.address); w.u8(setup.prefixLength); w.string(setup.gateway); w.strings(setup.dns)
            w.u32(setup.mtu); w.string(setup.hostName); w.bytes(setup.mac)
        }
        let length = UInt32(w.out.count)
        return [UInt8(truncatingIfNeeded: length), UInt8(truncatingIfNeeded: length >> 8),
                UInt8(truncatingIfNeeded: length >> 16), UInt8(truncatingIfNeeded: length >> 24)] + w.out
    }

    /// Decodes one frame body (tag and fields, without the length).
    public static func decode(_ body: ArraySlice<UInt8>) throws(AgentProtocolError) -> AgentMessage {
        var r = Reader(bytes: body)
        guard let tag = Tag(rawValue: try r.u8()) else { throw AgentProtocolError("unknown message tag \(body.first ?? 0)") }
        let message: AgentMessage
        switch tag {
        case .ready: message = .ready(version: try r.u32())
        case .started: message = .started(pid: Int32(bitPattern: try r.u32()))
        case .stdout: message = .stdout(try r.bytes())
        case .stderr: message = .stderr(try r.bytes())
        case .exited: message = .exited(status: Int32(bitPattern: try r.u32()))
        case .failed: message = .failed(status: Int32(bitPattern: try r.u32()), message: try r.string())
        case .exec:
            let arguments = try r.strings(), environment = try r.strings()
            let directory = try r.string(), user = try r.string()
            let terminal = try r.u8() != 0
            let rows = try r.u16(), columns = try r.u16()
            message = .exec(ExecRequest(arguments: arguments, environment: environment, workingDirectory: directory,
                                        user: user, terminal: terminal, rows: rows, columns: columns))
        case .stdin: message = .stdin(try r.bytes())
        case .closeStdin: message = .closeStdin
        case .signal: message = .signal(Int32(bitPattern: try r.u32()))
        case .resize: message = .resize(rows: try r.u16(), columns: try r.u16())
        case .openSession: message = .openSession
        case .identity: message = .identity(hostname: try r.string(), seed: try r.bytes())
        case .rootMounted: message = .rootMounted
        case .mountRoot: message = .mountRoot(devices: try r.strings())
        case .proof: message = .proof(try r.bytes())
        case .agentKey: message = .agentKey(try r.bytes())
        case .challenge: message = .challenge(nonce: try r.bytes())
        case .networkConfigured: message = .networkConfigured
        case .configureNetwork:
            let address = try r.string(), prefixLength = try r.u8(), gateway = try r.string(), dns = try r.strings()
            let mtu = try r.u32(), hostName = try r.string(), mac = try r.bytes()
            let setup = NetworkSetup(address: address, prefixLength: prefixLength, gateway: gateway, dns: dns, mtu: mtu,
                                     hostName: hostName, mac: mac)
            try setup.validate()
            message = .configureNetwork(setup)
        }
        guard r.isAtEnd else { throw AgentProtocolError("\(tag) message has \(r.remaining) trailing bytes") }
        return message
    }

    struct Writer {
        var out: [UInt8] = []
        mutating func tag(_ t: Tag) { out.append(t.rawValue) }
        mutating func u8(_ v: UInt8) { out.append(v) }
        mutating func u16(_ v: UInt16) { out.append(UInt8(truncatingIfNeeded: v)); out.append(UInt8(truncatingIfNeeded: v >> 8)) }
        mutating func u32(_ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
        mutating func bytes(_ b: [UInt8]) { u32(UInt32(b.count)); out += b }
        mutating func string(_ s: String) { bytes(Array(s.utf8)) }
        mutating func strings(_ list: [String]) { u32(UInt32(list.count)); for s in list { string(s) } }
    }

    struct Reader {
        let data: ArraySlice<UInt8>
        var at: Int
        init(bytes: ArraySlice<UInt8>) { self.data = bytes; self.at = bytes.startIndex }
        var isAtEnd: Bool { at == data.endIndex }
        var remaining: Int { data.endIndex - at }
        mutating func take(_ n: Int) throws(AgentProtocolError) -> ArraySlice<UInt8> {
            guard n >= 0, n <= remaining else { throw AgentProtocolError("message is truncated") }
            defer { at += n }
            return data[at..<at + n]
        }
        mutating func u8() throws(AgentProtocolError) -> UInt8 { try take(1).first! }
        mutating func u16() throws(AgentProtocolError) -> UInt16 {
            let b = try take(2); return UInt16(b[b.startIndex]) | UInt16(b[b.startIndex + 1]) << 8
        }
        mutating func u32() throws(AgentProtocolError) -> UInt32 {
            let b = try take(4)
            return (0..<4).reduce(0) { $0 | UInt32(b[b.startIndex + $1]) << (8 * UInt32($1)) }
        }
        mutating func bytes() throws(AgentProtocolError) -> [UInt8] { Array(try take(Int(try u32()))) }
        mutating func string() throws(AgentProtocolError) -> String {
            let b = try bytes()
            guard let s = String(validating: b, as: UTF8.self) else { throw AgentProtocolError("a string is not UTF-8") }
            return s
        }
        mutating func strings() throws(AgentProtocolError) -> [String] {
            let count = Int(try u32())
            guard count <= remaining / 4 else { throw AgentProtocolError("list of \(count) strings is longer than the message") }
            var list: [String] = []
            for _ in 0..<count { list.append(try string()) }
            return list
        }
    }
}

/// A malformed frame or message: the stream cannot be trusted after one.
public struct AgentProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = "agent protocol: " + description }
}

/// Splits a byte stream into messages.
public struct AgentFrameReader: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    /// Adds bytes read from the stream.
    public mutating func append(_ bytes: some Sequence<UInt8>) {
        if start > 0 && start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0 }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete message, or nil when more bytes are needed.
    public mutating func next() throws(AgentProtocolError) -> AgentMessage? {
        guard buffer.count - start >= 4 else { return nil }
        let length = (0..<4).reduce(0) { $0 | Int(buffer[start + $1]) << (8 * $1) }
        guard length >= 1, length <= AgentFrame.maximumLength else {
            throw AgentProtocolError("frame of \(length) bytes (at most \(AgentFrame.maximumLength))")
        }
        guard buffer.count - start - 4 >= length else { return nil }
        let body = buffer[(start + 4)..<(start + 4 + length)]
        start += 4 + length
        if start > 1 << 16 { buffer.removeFirst(start); start = 0 }
        return try AgentFrame.decode(body)
    }
}
