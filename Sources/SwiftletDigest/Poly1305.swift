/// Poly1305 (RFC 8439, section 2.5): a one-time authenticator. Its 32-byte key must authenticate
/// one message only (two messages under one key give the key away); a caller derives a fresh key
/// per message, e.g. with `HMACSHA256` over a sequence number. Fast where SHA-256 is not: the
/// migration stream's codes cost a few multiplications per 16 bytes, on any CPU.
///
/// The accumulator is kept in three limbs of 44, 44 and 42 bits, so each block's product with
/// `r` fits 128-bit sums of 64×64-bit products, and reduces modulo 2^130 − 5 with a multiply by 5.
public struct Poly1305: Sendable {
    private let r0, r1, r2: UInt64
    /// `r1` and `r2` times 20: 2^132 ≡ 4 × 5 (mod 2^130 − 5) for the limbs that wrap around.
    private let s1, s2: UInt64
    private let pad0, pad1: UInt64
    private var h0: UInt64 = 0, h1: UInt64 = 0, h2: UInt64 = 0
    private var pending: (UInt64, UInt64) = (0, 0)
    private var pendingCount = 0

    static let mask44: UInt64 = (1 << 44) - 1
    static let mask42: UInt64 = (1 << 42) - 1
    public static let keyLength = 32
    public static let tagLength = 16

    /// `key`: 32 bytes, r then s (r is clamped here, as the RFC says).
    public init(key: [UInt8]) {
        precondition(key.count == Self.keyLength, "a Poly1305 key is 32 bytes")
        let t0 = Self.word(key, 0), t1 = Self.word(key, 8)
        r0 = t0 & 0xffc_0fff_ffff
        r1 = ((t0 >> 44) | (t1 << 20)) & 0xfff_ffc0_ffff
        r2 = (t1 >> 24) & 0x00f_ffff_fc0f
        s1 = r1 * 20
        s2 = r2 * 20
        pad0 = Self.word(key, 16)
        pad1 = Self.word(key, 24)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public mutating func update(_ buffer: UnsafeRawBufferPointer) {
        var offset = 0
        if pendingCount > 0 {
            while pendingCount < 16 && offset < buffer.count {
                add(buffer[offset], at: pendingCount)
                pendingCount += 1
                offset += 1
            }
            guard pendingCount == 16 else { return }
            block(pending.0, pending.1, high: 1 << 40)
            pending = (0, 0)
            pendingCount = 0
        }
        while buffer.count - offset >= 16 {
            block(buffer.loadUnaligned(fromByteOffset: offset, as: UInt64.self).littleEndian,
                  buffer.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self).littleEndian, high: 1 << 40)
            offset += 16
        }
        while offset < buffer.count {
            add(buffer[offset], at: pendingCount)
            pendingCount += 1
            offset += 1
        }
    }

    /// The 16-byte tag of everything given to `update`.
    public mutating func finalize() -> [UInt8] {
        if pendingCount > 0 {
            // A last, short block: its bytes, then a 1, then zeros (no 2^128 bit).
            add(1, at: pendingCount)
            block(pending.0, pending.1, high: 0)
        }
        // The full carry, then h − p if h ≥ p (2^130 − 5 ≤ h < 2^131 at most once).
        var c: UInt64
        c = h1 >> 44; h1 &= Self.mask44; h2 &+= c
        c = h2 >> 42; h2 &= Self.mask42; h0 &+= c &* 5
        c = h0 >> 44; h0 &= Self.mask44; h1 &+= c
        c = h1 >> 44; h1 &= Self.mask44; h2 &+= c
        c = h2 >> 42; h2 &= Self.mask42; h0 &+= c &* 5
        c = h0 >> 44; h0 &= Self.mask44; h1 &+= c
        var g0 = h0 &+ 5
        c = g0 >> 44; g0 &= Self.mask44
        var g1 = h1 &+ c
        c = g1 >> 44; g1 &= Self.mask44
        var g2 = h2 &+ c &- (1 << 42)
        // g2's top bit clear: h + 5 reached 2^130, so h ≥ p and g is h − p.
        let takeG = (g2 >> 63) &- 1
        g0 &= takeG; g1 &= takeG; g2 &= takeG
        h0 = (h0 & ~takeG) | g0
        h1 = (h1 & ~takeG) | g1
        h2 = (h2 & ~takeG) | g2
        // + s, modulo 2^128.
        h0 &+= pad0 & Self.mask44
        c = h0 >> 44; h0 &= Self.mask44
        h1 &+= (((pad0 >> 44) | (pad1 << 20)) & Self.mask44) &+ c
        c = h1 >> 44; h1 &= Self.mask44
        h2 &+= ((pad1 >> 24) & Self.mask42) &+ c
        h2 &= Self.mask42
        let low = h0 | (h1 << 44), high = (h1 >> 20) | (h2 << 24)
        var tag = [UInt8](repeating: 0, count: 16)
        for i in 0..<8 {
            tag[i] = UInt8(truncatingIfNeeded: low >> (8 * UInt64(i)))
            tag[8 + i] = UInt8(truncatingIfNeeded: high >> (8 * UInt64(i)))
        }
        return tag
    }

    /// One 16-byte block (little-endian t0, t1) and its 2^128 bit (`high`, in the top limb's
    /// terms): h = (h + block) × r mod 2^130 − 5, partly reduced.
    @inline(__always)
    private mutating func block(_ t0: UInt64, _ t1: UInt64, high: UInt64) {
        h0 &+= t0 & Self.mask44
        h1 &+= ((t0 >> 44) | (t1 << 20)) & Self.mask44
        h2 &+= ((t1 >> 24) & Self.mask42) | high
        let d0 = Self.product(h0, r0) &+ Self.product(h1, s2) &+ Self.product(h2, s1)
        var d1 = Self.product(h0, r1) &+ Self.product(h1, r0) &+ Self.product(h2, s2)
        var d2 = Self.product(h0, r2) &+ Self.product(h1, r1) &+ Self.product(h2, r0)
        var c = UInt64(truncatingIfNeeded: d0 >> 44)
        h0 = UInt64(truncatingIfNeeded: d0) & Self.mask44
        d1 &+= UInt128(c)
        c = UInt64(truncatingIfNeeded: d1 >> 44)
        h1 = UInt64(truncatingIfNeeded: d1) & Self.mask44
        d2 &+= UInt128(c)
        c = UInt64(truncatingIfNeeded: d2 >> 42)
        h2 = UInt64(truncatingIfNeeded: d2) & Self.mask42
        h0 &+= c &* 5
        c = h0 >> 44
        h0 &= Self.mask44
        h1 &+= c
    }

    @inline(__always)
    private static func product(_ a: UInt64, _ b: UInt64) -> UInt128 {
        UInt128(a) &* UInt128(b)
    }

    @inline(__always)
    private mutating func add(_ byte: UInt8, at index: Int) {
        if index < 8 {
            pending.0 |= UInt64(byte) << (8 * UInt64(index))
        } else {
            pending.1 |= UInt64(byte) << (8 * UInt64(index - 8))
        }
    }

    private static func word(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }
}
