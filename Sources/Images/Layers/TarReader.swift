import SwiftletSystem

/// One entry of a tar archive (ustar, with GNU long names and PAX extended headers).
public struct TarEntry: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case file, directory, symlink(target: String), hardLink(target: String)
        case characterDevice(major: UInt32, minor: UInt32), blockDevice(major: UInt32, minor: UInt32), fifo
    }
    public var path: String
    public var kind: Kind
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var mtime: Int64
    public var size: UInt64
    /// Extended attributes from PAX `SCHILY.xattr.` records.
    public var xattrs: [String: [UInt8]]
}

/// Reads a tar archive from a byte source, entry by entry; each entry's data is read (or skipped)
/// before the next header. The archive is untrusted: every number in a header or PAX record is
/// checked (no conversion or sum can trap), sizes are bounded by `limits`, and anything out of
/// range is refused with an error that names the field.
public struct TarReader {
    public typealias Source = (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int

    private let source: Source
    private var remaining: UInt64 = 0
    private var padding: Int = 0
    private var offset: UInt64 = 0
    private let limits: ImportLimits

    /// `source` fills the buffer and returns how many bytes it read (0 at the end).
    public init(limits: ImportLimits = ImportLimits(), source: @escaping Source) {
        self.source = source
        self.limits = limits
    }

    /// The next entry, or nil at the end of the archive.
    public mutating func next() throws(SwiftletError) -> TarEntry? {
        try skipData()
        var pax: [String: [UInt8]] = [:]
        var longName: String?, longLink: String?
        var headerBytes = 0 // PAX and long-name bytes read for this entry
        while true {
            guard let header = try readBlock(allowEnd: true), header.contains(where: { $0 != 0 }) else { return nil }
            try verifyChecksum(header)
            let type = header[156]
            let size = try number(header[124..<136], field: "size")
            if [UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K")].contains(type) {
                guard size <= UInt64(limits.maxHeaderBytes - headerBytes) else {
                    throw SwiftletError(.invalidFormat, "tar entry at byte \(offset - 512) has more than \(limits.maxHeaderBytes) bytes of PAX or long-name headers")
                }
                headerBytes += Int(size)
            }
            switch type {
            case UInt8(ascii: "x"):
                pax.merge(try parsePAX(try readData(size))) { $1 }
                continue
            case UInt8(ascii: "g"):
                _ = try readData(size) // global defaults: nothing Swiftlet uses
                continue
            case UInt8(ascii: "L"):
                longName = cString(try readData(size)[...])
                continue
            case UInt8(ascii: "K"):
                longLink = cString(try readData(size)[...])
                continue
            default: break
            }
            var path = cString(header[0..<100])
            if header[257..<262].elementsEqual("ustar".utf8) {
                let prefix = cString(header[345..<500])
                if !prefix.isEmpty { path = prefix + "/" + path }
            }
            if let name = longName { path = name }
            if let p = pax["path"] { path = String(decoding: p, as: UTF8.self) }
            var link = cString(header[157..<257])
            if let l = longLink { link = l }
            if let l = pax["linkpath"] { link = String(decoding: l, as: UTF8.self) }
            guard path.utf8.count <= limits.maxPathBytes, link.utf8.count <= limits.maxPathBytes else {
                throw SwiftletError(.invalidFormat, "tar entry at byte \(offset - 512) has a path or link target longer than \(limits.maxPathBytes) bytes")
            }
            guard !path.utf8.contains(0), !link.utf8.contains(0) else {
                throw SwiftletError(.invalidFormat, "tar entry \(path) has a NUL byte in its path or link target")
            }
            let label = "tar entry \(path)"
            var entry = TarEntry(
                path: path, kind: .file, mode: UInt32(try number(header[100..<108], field: "mode") & 0o7777),
                uid: try Self.id(try number(header[108..<116], field: "uid"), "uid", label),
                gid: try Self.id(try number(header[116..<124], field: "gid"), "gid", label),
                mtime: try mtime(header[136..<148]), size: size, xattrs: [:])
            if let v = pax["uid"] { entry.uid = try Self.id(try Self.paxUnsigned(v, "uid", label), "uid", label) }
            if let v = pax["gid"] { entry.gid = try Self.id(try Self.paxUnsigned(v, "gid", label), "gid", label) }
            if let v = pax["size"] { entry.size = try Self.paxUnsigned(v, "size", label) }
            if let v = pax["mtime"] { entry.mtime = try Self.paxTime(v, label) }
            guard entry.size <= limits.maxLayerBytes else {
                throw SwiftletError(.invalidFormat, "\(label) declares \(entry.size) bytes of data, more than a layer may hold (\(limits.maxLayerBytes); SWIFTLET_MAX_LAYER_SIZE raises it)")
            }
            for (key, value) in pax where key.hasPrefix("SCHILY.xattr.") { entry.xattrs[String(key.dropFirst(13))] = value }
            let major = try number(header[329..<337], field: "devmajor"), minor = try number(header[337..<345], field: "devminor")
            switch type {
            case UInt8(ascii: "0"), 0, UInt8(ascii: "7"): entry.kind = .file
            case UInt8(ascii: "1"): entry.kind = .hardLink(target: link); entry.size = 0
            case UInt8(ascii: "2"): entry.kind = .symlink(target: link); entry.size = 0
            case UInt8(ascii: "3"), UInt8(ascii: "4"):
                // Linux's device numbers: 12-bit major, 20-bit minor.
                guard major <= 0xFFF, minor <= 0xF_FFFF else {
                    throw SwiftletError(.invalidFormat, "\(label) has device number \(major):\(minor), out of Linux's range")
                }
                let (ma, mi) = (UInt32(major), UInt32(minor))
                entry.kind = type == UInt8(ascii: "3") ? .characterDevice(major: ma, minor: mi) : .blockDevice(major: ma, minor: mi)
                entry.size = 0
            case UInt8(ascii: "5"): entry.kind = .directory; entry.size = 0
            case UInt8(ascii: "6"): entry.kind = .fifo; entry.size = 0
            default:
                throw SwiftletError(.unsupported, "tar entry \(path) has unsupported type '\(String(UnicodeScalar(type)))'")
            }
            // What the archive holds after the header: PAX's size overrides the header's.
            let stored = pax["size"] != nil ? try Self.paxUnsigned(pax["size"]!, "size", label) : size
            remaining = entry.kind == .file ? entry.size : 0
            padding = Int((512 - stored % 512) % 512)
            if entry.kind != .file && stored > 0 { remaining = stored; try skipData() }
            return entry
        }
    }

    /// Reads up to `buffer.count` bytes of the current entry's data; 0 at its end.
    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        guard remaining > 0 else { return 0 }
        let want = Int(min(UInt64(buffer.count), remaining))
        let n = try fill(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]))
        guard n == want else { throw truncated() }
        remaining -= UInt64(n)
        return n
    }

    private mutating func skipData() throws(SwiftletError) {
        var scratch = [UInt8](repeating: 0, count: 65536)
        while remaining > 0 {
            let n = Int(min(remaining, UInt64(scratch.count)))
            let got = try scratch.withMutableBytes { b throws(SwiftletError) in try fill(UnsafeMutableRawBufferPointer(rebasing: b[0..<n])) }
            guard got == n else { throw truncated() }
            remaining -= UInt64(n)
        }
        if padding > 0 {
            let p = padding
            let got = try scratch.withMutableBytes { b throws(SwiftletError) in try fill(UnsafeMutableRawBufferPointer(rebasing: b[0..<p])) }
            guard got == p else { throw truncated() }
            padding = 0
        }
    }

    private mutating func readData(_ size: UInt64) throws(SwiftletError) -> [UInt8] {
        guard size <= 16 << 20 else { throw SwiftletError(.invalidFormat, "tar metadata entry of \(size) bytes is too large") }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        let n = try bytes.withMutableBytes { b throws(SwiftletError) in try fill(b) }
        guard n == Int(size) else { throw truncated() }
        padding = Int((512 - size % 512) % 512)
        remaining = 0
        try skipData()
        return bytes
    }

    private mutating func readBlock(allowEnd: Bool) throws(SwiftletError) -> [UInt8]? {
        var block = [UInt8](repeating: 0, count: 512)
        let n = try block.withMutableBytes { b throws(SwiftletError) in try fill(b) }
        if n == 0 && allowEnd { return nil }
        guard n == 512 else { throw truncated() }
        return block
    }

    /// Reads until `buffer` is full or the source ends.
    private mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try source(UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            if n == 0 { break }
            done += n
        }
        offset += UInt64(done)
        return done
    }

    private func truncated() -> SwiftletError {
        SwiftletError(.invalidFormat, "tar archive is truncated at byte \(offset)")
    }

    private func verifyChecksum(_ header: [UInt8]) throws(SwiftletError) {
        let stored = try number(header[148..<156], field: "checksum")
        var sum: UInt64 = 0
        for (i, b) in header.enumerated() { sum += (148..<156).contains(i) ? 32 : UInt64(b) }
        guard sum == stored else { throw SwiftletError(.invalidFormat, "tar header at byte \(offset - 512) has a bad checksum: the archive is corrupt") }
    }

    /// An octal field, or GNU base-256 when the first byte's high bit is set. Negative and
    /// overflowing values are refused.
    private func number(_ field: ArraySlice<UInt8>, field name: String) throws(SwiftletError) -> UInt64 {
        if let first = field.first, first & 0x80 != 0 {
            guard first & 0x40 == 0 else {
                throw SwiftletError(.invalidFormat, "tar header field \(name) at byte \(offset - 512) is negative: the archive is corrupt")
            }
            var value = UInt64(first & 0x3F)
            for b in field.dropFirst() {
                guard value >> 56 == 0 else {
                    throw SwiftletError(.invalidFormat, "tar header field \(name) at byte \(offset - 512) does not fit in 64 bits: the archive is corrupt")
                }
                value = value << 8 | UInt64(b)
            }
            return value
        }
        var value: UInt64 = 0
        for b in field {
            if b == 0 || b == 32 { if value > 0 || b == 0 { break } else { continue } }
            guard b >= 48 && b <= 55 else { throw SwiftletError(.invalidFormat, "tar header field \(name) is not octal: the archive is corrupt") }
            value = value << 3 | UInt64(b - 48)
        }
        return value
    }

    /// The mtime field: a negative base-256 time (before 1970) reads as 0, which is what EROFS stores.
    private func mtime(_ field: ArraySlice<UInt8>) throws(SwiftletError) -> Int64 {
        if let first = field.first, first & 0xC0 == 0xC0 { return 0 }
        let value = try number(field, field: "mtime")
        guard let time = Int64(exactly: value) else {
            throw SwiftletError(.invalidFormat, "tar header field mtime at byte \(offset - 512) is out of range: the archive is corrupt")
        }
        return time
    }

    /// A user or group id, which Linux keeps in 32 bits.
    static func id(_ value: UInt64, _ name: String, _ entry: String) throws(SwiftletError) -> UInt32 {
        guard let id = UInt32(exactly: value) else {
            throw SwiftletError(.invalidFormat, "\(entry) has \(name) \(value), more than 32 bits")
        }
        return id
    }

    /// A PAX record holding an unsigned decimal number (digits only, at most 64 bits).
    static func paxUnsigned(_ bytes: [UInt8], _ key: String, _ entry: String) throws(SwiftletError) -> UInt64 {
        let text = String(decoding: bytes, as: UTF8.self)
        guard !bytes.isEmpty, bytes.allSatisfy({ $0 >= 48 && $0 <= 57 }), let value = UInt64(text) else {
            throw SwiftletError(.invalidFormat, "\(entry) has a PAX \(key) of '\(text.prefix(40))', not a number of at most 64 bits")
        }
        return value
    }

    /// A PAX time, "[-]SECONDS[.FRACTION]": whole seconds; before 1970 reads as 0 (what EROFS stores).
    static func paxTime(_ bytes: [UInt8], _ entry: String) throws(SwiftletError) -> Int64 {
        let negative = bytes.first == UInt8(ascii: "-")
        let body = bytes.dropFirst(negative ? 1 : 0)
        let whole = body.prefix { $0 != UInt8(ascii: ".") }
        let fraction = body.dropFirst(whole.count + 1)
        guard !whole.isEmpty, whole.allSatisfy({ $0 >= 48 && $0 <= 57 }), fraction.allSatisfy({ $0 >= 48 && $0 <= 57 }),
              let seconds = Int64(String(decoding: whole, as: UTF8.self)) else {
            throw SwiftletError(.invalidFormat, "\(entry) has a PAX mtime of '\(String(decoding: bytes.prefix(40), as: UTF8.self))', not a time Swiftlet can store")
        }
        return negative ? 0 : seconds
    }

    private func cString(_ bytes: ArraySlice<UInt8>) -> String {
        String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// PAX records: "LENGTH key=value\n".
    private func parsePAX(_ data: [UInt8]) throws(SwiftletError) -> [String: [UInt8]] {
        var records: [String: [UInt8]] = [:]
        var at = 0
        while at < data.count {
            guard let space = data[at...].firstIndex(of: 32), space > at, space - at <= 19,
                  data[at..<space].allSatisfy({ $0 >= 48 && $0 <= 57 }),
                  let length = Int(String(decoding: data[at..<space], as: UTF8.self)),
                  length > space - at, length <= data.count - at, data[at + length - 1] == 10,
                  let equals = data[(space + 1)..<(at + length)].firstIndex(of: UInt8(ascii: "=")) else {
                throw SwiftletError(.invalidFormat, "tar PAX header is malformed")
            }
            records[String(decoding: data[(space + 1)..<equals], as: UTF8.self)] = Array(data[(equals + 1)..<(at + length - 1)])
            at += length
        }
        return records
    }
}
