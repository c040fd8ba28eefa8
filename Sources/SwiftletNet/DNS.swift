/// DNS messages (RFC 1035; AAAA from RFC 3596), read as far as the filter needs: the header, the
/// questions, and the answer section's A, AAAA and CNAME records. Hostile input: every count is
/// checked against the bytes present, names are bounded (255 bytes, 63 per label) and so is the
/// number of compression pointers followed, so a message can neither loop nor make the parser
/// allocate much more than its own size.

/// A domain name as its labels (bytes as sent).
struct DNSName: Equatable {
    var labels: [[UInt8]]

    /// The longest name on the wire (RFC 1035 §2.3.4) and the most compression pointers followed.
    static let maximumLength = 255, maximumPointers = 16

    /// The name in lowercase with dots between labels and no trailing dot, if every label is made
    /// of letters, digits, '-' and '_' only; nil otherwise (such a name is never allowed: a label
    /// with a dot in it would match differently from what a resolver looks up).
    var text: String? {
        var result = ""
        for label in labels {
            guard label.allSatisfy({ HostPattern.isHostByte($0) || $0 == UInt8(ascii: "_") }) else { return nil }
            if !result.isEmpty { result += "." }
            result += String(decoding: label.map(Self.lowercase), as: UTF8.self)
        }
        return result
    }

    /// Reads the name at `offset` of `message`; `offset` moves past it (past the first pointer).
    static func read(_ message: UnsafeRawBufferPointer, at offset: inout Int) -> DNSName? {
        var labels: [[UInt8]] = [], position = offset, jumps = 0, length = 1, resume: Int?
        while true {
            guard position < message.count else { return nil }
            let byte = message[position]
            switch byte & 0xC0 {
            case 0x00:
                let count = Int(byte)
                if count == 0 {
                    offset = resume ?? position + 1
                    return DNSName(labels: labels)
                }
                length += count + 1
                guard length <= maximumLength, position + 1 + count <= message.count else { return nil }
                labels.append(Array(message[(position + 1)..<(position + 1 + count)]))
                position += 1 + count
            case 0xC0:
                jumps += 1
                guard jumps <= maximumPointers, position + 2 <= message.count else { return nil }
                if resume == nil { resume = position + 2 }
                position = Int(message.be16(position) & 0x3FFF)
            default:
                return nil  // 0x40 and 0x80 label types are obsolete or unused
            }
        }
    }

    /// The name in wire form, uncompressed.
    var wire: [UInt8] { labels.flatMap { [UInt8($0.count)] + $0 } + [0] }

    /// Compares names the way DNS does: ASCII letters case-insensitively.
    func sameName(as other: DNSName) -> Bool {
        labels.count == other.labels.count && zip(labels, other.labels).allSatisfy { a, b in
            a.count == b.count && zip(a, b).allSatisfy { x, y in Self.lowercase(x) == Self.lowercase(y) }
        }
    }

    static func lowercase(_ byte: UInt8) -> UInt8 { byte >= 0x41 && byte <= 0x5A ? byte + 0x20 : byte }
}

struct DNSQuestion: Equatable {
    var name: DNSName
    var type: UInt16
    var `class`: UInt16
}

struct DNSRecord: Equatable {
    enum Data: Equatable { case address(IPAddress), cname(DNSName), other }
    var name: DNSName
    var type: UInt16
    var ttl: UInt32
    var data: Data
}

enum DNSType {
    static let a: UInt16 = 1, cname: UInt16 = 5, aaaa: UInt16 = 28
}

/// A DNS message: header fields, questions and (when `answers` is asked for) the answer records.
struct DNSMessage {
    var id: UInt16
    var flags: UInt16
    var questions: [DNSQuestion]
    var answers: [DNSRecord]

    var isResponse: Bool { flags & 0x8000 != 0 }
    var opcode: UInt8 { UInt8(truncatingIfNeeded: flags >> 11) & 0x0F }
    var responseCode: UInt8 { UInt8(truncatingIfNeeded: flags) & 0x0F }

    /// The most CNAMEs followed from a question's name.
    static let maximumAliases = 16
    static let noError: UInt8 = 0, nameError: UInt8 = 3, refused: UInt8 = 5

    /// Parses `message`; nil when it is malformed (counts past the bytes there, bad names, records
    /// overrunning the message). `readAnswers: false` stops after the questions.
    init?(_ message: UnsafeRawBufferPointer, readAnswers: Bool = true) {
        guard message.count >= 12 else { return nil }
        id = message.be16(0)
        flags = message.be16(2)
        let questionCount = Int(message.be16(4)), answerCount = Int(message.be16(6))
        // A question takes at least 5 bytes, a record 11: counts the bytes cannot hold are lies.
        guard 12 + questionCount * 5 + (readAnswers ? answerCount * 11 : 0) <= message.count else { return nil }
        var offset = 12
        questions = []
        for _ in 0..<questionCount {
            guard let name = DNSName.read(message, at: &offset), offset + 4 <= message.count else { return nil }
            questions.append(DNSQuestion(name: name, type: message.be16(offset), class: message.be16(offset + 2)))
            offset += 4
        }
        answers = []
        guard readAnswers else { return }
        for _ in 0..<answerCount {
            guard let name = DNSName.read(message, at: &offset), offset + 10 <= message.count else { return nil }
            let type = message.be16(offset), ttl = message.be32(offset + 4), length = Int(message.be16(offset + 8))
            offset += 10
            guard offset + length <= message.count else { return nil }
            var data = DNSRecord.Data.other
            switch type {
            case DNSType.a where length == 4:
                data = .address(.v4(message.be32(offset)))
            case DNSType.aaaa where length == 16:
                data = .address(.v6(message.be64(offset), message.be64(offset + 8)))
            case DNSType.cname:
                var target = offset
                guard let name = DNSName.read(message, at: &target), target <= offset + length else { return nil }
                data = .cname(name)
            case DNSType.a, DNSType.aaaa:
                return nil  // an address of the wrong size
            default:
                break
            }
            answers.append(DNSRecord(name: name, type: type, ttl: ttl, data: data))
            offset += length
        }
    }

    /// The A and AAAA addresses that answer `question`'s name, following CNAMEs (in any order,
    /// at most `maximumAliases` of them), each with its TTL.
    func addresses(answering name: DNSName) -> [(IPAddress, UInt32)] {
        var names = [name], result: [(IPAddress, UInt32)] = []
        var changed = true
        while changed && names.count <= Self.maximumAliases {
            changed = false
            for record in answers where names.contains(where: { $0.sameName(as: record.name) }) {
                if case .cname(let target) = record.data, names.count <= Self.maximumAliases, !names.contains(where: { $0.sameName(as: target) }) {
                    names.append(target)
                    changed = true
                }
            }
        }
        for record in answers where names.contains(where: { $0.sameName(as: record.name) }) {
            if case .address(let address) = record.data { result.append((address, record.ttl)) }
        }
        return result
    }

    /// An answer to a query: the query's id, opcode, RD bit and question, QR and RA set, the
    /// response code, and the given answer records (already in wire form, after the question).
    static func reply(to query: DNSMessage, responseCode: UInt8, answers: [[UInt8]] = []) -> [UInt8] {
        let flags = 0x8080 | (query.flags & 0x7900) | UInt16(responseCode)  // QR, RA; opcode and RD kept
        var bytes = FrameBuilder.be16(Int(query.id)) + FrameBuilder.be16(Int(flags))
        bytes += FrameBuilder.be16(query.questions.count) + FrameBuilder.be16(answers.count) + [0, 0, 0, 0]
        for question in query.questions {
            bytes += question.name.wire + FrameBuilder.be16(Int(question.type)) + FrameBuilder.be16(Int(question.class))
        }
        return bytes + answers.flatMap { $0 }
    }

    /// An A record for the first question's name (a pointer to it at offset 12) with `address`.
    static func addressRecord(_ address: IPAddress, ttl: UInt32) -> [UInt8] {
        let data = address.bytes
        return [0xC0, 12] + FrameBuilder.be16(Int(address.isV4 ? DNSType.a : DNSType.aaaa)) + [0, 1]
            + FrameBuilder.be32(ttl) + FrameBuilder.be16(data.count) + data
    }
}
