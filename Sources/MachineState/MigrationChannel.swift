import SwiftletDigest
import SwiftletSystem

/// The kinds of message a migration stream carries (docs/migration.md has the layout of each).
public enum MigrationMessage: UInt8, Sendable, CaseIterable {
    /// Destination → source, first: magic, protocol version, the destination's nonce.
    case hello = 1
    /// Source → destination: magic, version, the source's nonce and its proof of the token.
    case authenticate = 2
    /// Destination → source: the destination's proof of the token. Every later message carries
    /// a code under a key both derived from the token and the two nonces.
    case accepted = 3
    /// Source: the snapshot id and the guest memory regions.
    case layout = 4
    /// Source: a run of pages (first page number, count, the pages' bytes).
    case pages = 5
    /// Source: a run of pages that are now all zeros (first page number, count).
    case zeroPages = 6
    /// Source: the machine's state (a snapshot state file's bytes), sent while it is paused.
    case state = 7
    /// Source: everything is sent.
    case done = 8
    /// Destination: the machine is restored and waits for `go`.
    case ready = 9
    /// Source: the destination takes over (the source stays paused from here on).
    case go = 10
    /// Destination: it runs the machine.
    case resumed = 11
    /// Either side: it gives up, with a reason.
    case abort = 12
    /// Source, after `layout`: the writable disks that go along (drive index, size in bytes).
    case disks = 13
    /// Source: bytes of a writable disk (drive index, offset, the bytes).
    case diskData = 14
    /// Source, before `state` (post-copy): the pages that come only after `go` (a bitmap, one bit
    /// per page, 64-bit little-endian words).
    case postcopy = 15
    /// Destination (post-copy, after `go`): pages its guest is waiting for (first page, count).
    case request = 16
    /// Destination (post-copy): every page has arrived; the source may go.
    case complete = 17
    /// Source, after each round while the machine runs: that round is all sent.
    case roundEnd = 18
    /// Destination, on each `roundEnd`: it has taken that round in (its disk writes synced).
    /// The source waits for them all before it pauses, so the pause starts with nothing in flight.
    case roundDone = 19
}

/// One end of an authenticated migration stream over a connected stream socket the caller owns
/// (TCP or Unix; the caller closes it). The destination `accept`s, the source `connect`s; both
/// prove they hold the same one-time token, and every message after that carries a Poly1305 tag
/// under a key of its own: HMAC-SHA256, keyed with the direction's key (derived from the token
/// and both sides' nonces), of the message's sequence number. A message that was changed,
/// dropped, repeated or reordered is refused. (Poly1305 rather than an HMAC over the whole
/// message: it costs a few multiplications per 16 bytes on any CPU, where SHA-256 without the
/// CPU's SHA extensions held the stream to ~170 MiB/s. The stream is authenticated, not
/// encrypted: docs/migration.md.)
///
/// Everything received is untrusted: frames are bounded (`maximumPayload`), and the messages'
/// contents are checked by their readers.
public final class MigrationChannel {
    public static let magic: [UInt8] = Array("SWLTMIG\0".utf8)
    public static let version: UInt32 = 2
    public static let tokenLength = 32
    static let nonceLength = 32
    static let proofLength = 32
    static let codeLength = Poly1305.tagLength
    /// The largest payload of one message: a run of 256 pages and its header, or a state file.
    public static let maximumPayload = 32 << 20
    /// How long a read waits for the peer before the migration is given up.
    public static let defaultTimeoutMilliseconds = 30_000

    private let socket: Int32
    private let timeoutMilliseconds: Int
    /// Each direction's key, as an HMAC already keyed with it (copied for each message's key).
    private var sendKey: HMACSHA256.Code?
    private var receiveKey: HMACSHA256.Code?
    private var sent: UInt64 = 0
    private var received: UInt64 = 0
    /// Bytes sent so far, frames included.
    public private(set) var bytesSent: UInt64 = 0
    /// The most bytes per second to send (nil: as fast as the stream takes them): `send` sleeps
    /// when it is ahead of this rate since the cap was set.
    public var bandwidthBytesPerSecond: UInt64? {
        didSet { capStart = (MonotonicClock.now, bytesSent) }
    }
    private var capStart: (time: UInt64, bytes: UInt64) = (0, 0)

    /// Reads wait at most `timeoutMilliseconds` for the peer, and so do sends it takes nothing of.
    private init(socket: Int32, timeoutMilliseconds: Int) throws(SwiftletError) {
        self.socket = socket
        self.timeoutMilliseconds = timeoutMilliseconds
        try UnixSocket.setSendTimeLimit(socket, milliseconds: timeoutMilliseconds)
    }

    /// A new one-time token (random).
    public static func newToken() throws(SwiftletError) -> [UInt8] {
        var token = [UInt8](repeating: 0, count: tokenLength)
        try token.withMutableBytes { b throws(SwiftletError) in try SystemRandom.fill(b) }
        return token
    }

    /// The token as it is shown and typed: 64 lowercase hex digits.
    public static func tokenText(_ token: [UInt8]) -> String { Hex.encode(token) }

    /// The token `text` names; throws `.invalidArgument` unless it is 64 hex digits.
    public static func token(fromText text: String) throws(SwiftletError) -> [UInt8] {
        guard text.utf8.count == tokenLength * 2 else {
            throw SwiftletError(.invalidArgument, "a migration token is \(tokenLength * 2) hex digits, as `machine receive` printed it (this one has \(text.utf8.count) characters)")
        }
        guard let token = Hex.decode(text) else {
            throw SwiftletError(.invalidArgument, "a migration token is hex digits only, as `machine receive` printed it")
        }
        return token
    }

    // MARK: The handshake

    /// The destination's side: says hello, checks the source's proof of `token`, proves it holds
    /// it too. A source with another protocol version is told so (an `abort`) and refused; a
    /// source without the token is refused and sent nothing more.
    public static func accept(_ socket: Int32, token: [UInt8],
                              timeoutMilliseconds: Int = defaultTimeoutMilliseconds) throws(SwiftletError) -> MigrationChannel {
        let channel = try MigrationChannel(socket: socket, timeoutMilliseconds: timeoutMilliseconds)
        let nonce = try random(nonceLength)
        try channel.sendFrame(.hello, magic + LittleEndian.bytes(UInt64(version), 4) + nonce)
        let (type, payload) = try channel.receiveFrame()
        guard type == .authenticate, payload.count == magic.count + 4 + nonceLength + proofLength,
              Array(payload[0..<magic.count]) == magic else {
            throw SwiftletError(.invalidFormat, "the migration source did not authenticate (not a Swiftlet migration stream)")
        }
        let theirVersion = UInt32(LittleEndian.read(payload, at: magic.count, count: 4))
        guard theirVersion == version else {
            try? channel.sendFrame(.abort, Array("protocol version \(version) expected".utf8))
            throw SwiftletError(.unsupported, "the migration source speaks protocol version \(theirVersion); this Swiftlet speaks \(version)")
        }
        let sourceNonce = Array(payload[(magic.count + 4)..<(magic.count + 4 + nonceLength)])
        let proof = Array(payload[(magic.count + 4 + nonceLength)...])
        guard HMACSHA256.constantTimeEqual(proof, Self.proof(token, "source", nonce, sourceNonce)) else {
            throw SwiftletError(.permissionDenied, "the migration source does not hold the token: refused")
        }
        try channel.sendFrame(.accepted, Self.proof(token, "destination", nonce, sourceNonce))
        channel.receiveKey = HMACSHA256.Code(key: Self.proof(token, "source to destination", nonce, sourceNonce))
        channel.sendKey = HMACSHA256.Code(key: Self.proof(token, "destination to source", nonce, sourceNonce))
        return channel
    }

    /// The source's side: answers the destination's hello with its proof of `token` and checks
    /// the destination's.
    public static func connect(_ socket: Int32, token: [UInt8],
                               timeoutMilliseconds: Int = defaultTimeoutMilliseconds) throws(SwiftletError) -> MigrationChannel {
        let channel = try MigrationChannel(socket: socket, timeoutMilliseconds: timeoutMilliseconds)
        let (type, payload) = try channel.receiveFrame()
        guard type == .hello, payload.count == magic.count + 4 + nonceLength, Array(payload[0..<magic.count]) == magic else {
            throw SwiftletError(.invalidFormat, "the migration destination did not say hello (not a Swiftlet migration stream)")
        }
        let theirVersion = UInt32(LittleEndian.read(payload, at: magic.count, count: 4))
        guard theirVersion == version else {
            throw SwiftletError(.unsupported, "the migration destination speaks protocol version \(theirVersion); this Swiftlet speaks \(version)")
        }
        let destinationNonce = Array(payload[(magic.count + 4)...])
        let nonce = try random(nonceLength)
        try channel.sendFrame(.authenticate, magic + LittleEndian.bytes(UInt64(version), 4) + nonce
                              + Self.proof(token, "source", destinationNonce, nonce))
        let answer: MigrationMessage, proof: [UInt8]
        do throws(SwiftletError) {
            (answer, proof) = try channel.receiveFrame()
        } catch {
            // A destination sends nothing to a source without the token.
            throw SwiftletError(.permissionDenied, "the migration destination hung up on the handshake: the token is not the one it printed, "
                                + "or it no longer waits (\(error.message))")
        }
        if answer == .abort {
            throw SwiftletError(.unsupported, "the migration destination refused: \(Self.reason(proof))")
        }
        guard answer == .accepted, HMACSHA256.constantTimeEqual(proof, Self.proof(token, "destination", destinationNonce, nonce)) else {
            throw SwiftletError(.permissionDenied, "the migration destination did not prove it holds the token: refused")
        }
        channel.sendKey = HMACSHA256.Code(key: Self.proof(token, "source to destination", destinationNonce, nonce))
        channel.receiveKey = HMACSHA256.Code(key: Self.proof(token, "destination to source", destinationNonce, nonce))
        return channel
    }

    private static func proof(_ token: [UInt8], _ label: String, _ destinationNonce: [UInt8], _ sourceNonce: [UInt8]) -> [UInt8] {
        HMACSHA256.authenticationCode(of: Array("swiftlet migration \(label)".utf8) + destinationNonce + sourceNonce, key: token)
    }

    private static func random(_ count: Int) throws(SwiftletError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withMutableBytes { b throws(SwiftletError) in try SystemRandom.fill(b) }
        return bytes
    }

    /// An abort's reason as text fit to show (printable ASCII, at most 500 characters).
    static func reason(_ payload: [UInt8]) -> String {
        String(decoding: payload.prefix(500).map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
    }

    // MARK: Messages

    /// Sends one message: `payload` is `head` followed by `body`. `body` must not change while
    /// this runs (it is read twice, for the stream and for the code): guest memory that may change
    /// goes through `sendCopy`.
    public func send(_ type: MigrationMessage, _ head: [UInt8] = [], body: UnsafeRawBufferPointer? = nil) throws(SwiftletError) {
        precondition(sendKey != nil, "send after the handshake")
        try sendFrame(type, head, body: body)
    }

    /// `send` of bytes that may change meanwhile (a running guest's memory): they are copied
    /// first, so the stream and the code see the same bytes.
    public func sendCopy(_ type: MigrationMessage, _ head: [UInt8], of body: UnsafeRawBufferPointer) throws(SwiftletError) {
        if copyBuffer.count < body.count {
            copyBuffer.deallocate()
            copyBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: body.count, alignment: 4096)
        }
        let copy = UnsafeMutableRawBufferPointer(rebasing: copyBuffer[0..<body.count])
        copy.copyMemory(from: body)
        try send(type, head, body: UnsafeRawBufferPointer(copy))
    }

    private var copyBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 4096)

    deinit { copyBuffer.deallocate() }

    /// Sends an `abort` with `reason`, if the stream still takes it.
    public func abort(_ reason: String) {
        guard sendKey != nil else { return }
        try? sendFrame(.abort, Array(reason.utf8.prefix(500)))
    }

    /// The next message. An `abort` from the peer is thrown as `.guestFailure`-free
    /// `.systemCall` error with its reason; a message whose code does not check is an error.
    public func receive() throws(SwiftletError) -> (MigrationMessage, [UInt8]) {
        precondition(receiveKey != nil, "receive after the handshake")
        let (type, payload) = try receiveFrame()
        if type == .abort { throw SwiftletError(.systemCall, "the other side gave up the migration: \(Self.reason(payload))") }
        return (type, payload)
    }

    /// The next message, which must be `expected`.
    public func receive(_ expected: MigrationMessage) throws(SwiftletError) -> [UInt8] {
        let (type, payload) = try receive()
        guard type == expected else {
            throw SwiftletError(.invalidFormat, "the migration stream sent \(type) where \(expected) was due")
        }
        return payload
    }

    /// Whether a message has started to arrive (poll without waiting).
    public func hasInput() throws(SwiftletError) -> Bool {
        try Poll.wait([socket], timeoutMilliseconds: 0)[0]
    }

    // Frame: type (1 byte), 3 zero bytes, payload length (4 bytes LE), payload, then (after the
    // handshake) the HMAC-SHA256 of the sequence number (8 bytes LE), the first 8 bytes and the
    // payload.
    private func sendFrame(_ type: MigrationMessage, _ head: [UInt8], body: UnsafeRawBufferPointer? = nil) throws(SwiftletError) {
        let length = head.count + (body?.count ?? 0)
        precondition(length <= Self.maximumPayload)
        let header: [UInt8] = [type.rawValue, 0, 0, 0] + LittleEndian.bytes(UInt64(length), 4)
        var tag: [UInt8] = []
        if let key = sendKey {
            var code = Self.code(key, sequence: sent)
            code.update(header)
            code.update(head)
            if let body { code.update(body) }
            tag = code.finalize()
        }
        // A message and its code in one write when it is small (every control message, and the
        // state): one wakeup of the peer instead of two, which on a busy or single CPU is a
        // context switch each. A large body (pages, disk chunks) is written where it lies.
        var frame = header + head
        if let body, body.count >= 4096, sendKey != nil {
            try write(frame)
            try write(body)
            try write(tag)
        } else {
            if let body { frame += Array(body) }
            try write(frame + tag)
        }
        if sendKey != nil { sent += 1 }
        bytesSent += UInt64(header.count + length + (sendKey == nil ? 0 : Self.codeLength))
        if let rate = bandwidthBytesPerSecond, rate > 0 {
            // Where the cap says this many bytes may be sent: wait until then.
            let due = capStart.time + UInt64(Double(bytesSent - capStart.bytes) / Double(rate) * 1e9)
            let now = MonotonicClock.now
            if due > now { MonotonicClock.sleep(nanoseconds: due - now) }
        }
    }

    private func receiveFrame() throws(SwiftletError) -> (MigrationMessage, [UInt8]) {
        let header = try read(8)
        let length = Int(LittleEndian.read(header, at: 4, count: 4))
        guard header[1] == 0, header[2] == 0, header[3] == 0, let type = MigrationMessage(rawValue: header[0]) else {
            throw SwiftletError(.invalidFormat, "the migration stream sent a corrupt frame header")
        }
        guard length <= Self.maximumPayload else {
            throw SwiftletError(.invalidFormat, "the migration stream sent a \(length)-byte message (at most \(Self.maximumPayload))")
        }
        let payload = try read(length)
        if let key = receiveKey {
            let code = try read(Self.codeLength)
            var expected = Self.code(key, sequence: received)
            expected.update(header)
            expected.update(payload)
            guard HMACSHA256.constantTimeEqual(code, expected.finalize()) else {
                throw SwiftletError(.invalidFormat, "a migration message failed its authentication check (changed, reordered or not from the token's holder)")
            }
            received += 1
        }
        return (type, payload)
    }

    /// The authenticator of message number `sequence` in a direction: Poly1305 under that
    /// message's own key, HMAC-SHA256 of the sequence number under the direction's key.
    private static func code(_ key: HMACSHA256.Code, sequence: UInt64) -> Poly1305 {
        var oneTime = key
        oneTime.update(LittleEndian.bytes(sequence, 8))
        return Poly1305(key: oneTime.finalize())
    }

    /// The time limit, for messages.
    private var limitText: String {
        timeoutMilliseconds % 1000 == 0 ? "\(timeoutMilliseconds / 1000) s" : "\(timeoutMilliseconds) ms"
    }

    private func write(_ bytes: [UInt8]) throws(SwiftletError) {
        try bytes.withBytes { raw throws(SwiftletError) in try write(raw) }
    }

    private func write(_ raw: UnsafeRawBufferPointer) throws(SwiftletError) {
        guard !raw.isEmpty else { return }
        do throws(SwiftletError) {
            try UnixSocket.sendAll(socket, raw, what: "migration stream")
        } catch where error.cause == .resourceTemporarilyUnavailable {
            throw SwiftletError(.systemCall, "the other side of the migration took nothing for \(limitText): given up")
        } catch {
            throw SwiftletError(.systemCall, "the migration stream broke: \(error.description)")
        }
    }

    private func readSome(into bytes: inout [UInt8], from offset: Int) throws(SwiftletError) -> Int {
        let socket = self.socket
        return try bytes.withMutableBytes { raw throws(SwiftletError) -> Int in
            try OwnedFileDescriptor.readSome(fd: socket, into: UnsafeMutableRawBufferPointer(rebasing: raw[offset...]), what: "migration stream")
        }
    }

    private func read(_ count: Int) throws(SwiftletError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        let deadline = MonotonicClock.now + UInt64(timeoutMilliseconds) * 1_000_000
        while done < count {
            guard try Poll.wait([socket], deadline: deadline)[0] else {
                throw SwiftletError(.systemCall, "the other side of the migration sent nothing for \(limitText): given up")
            }
            let n = try readSome(into: &bytes, from: done)
            guard n > 0 else { throw SwiftletError(.systemCall, "the migration stream ended early (the other side went away)") }
            done += n
        }
        return bytes
    }
}
