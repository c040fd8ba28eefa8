import SwiftletSystem

/// A small encoder for the ACPI Machine Language objects Swiftlet's DSDT needs
/// (ACPI 6.5 section 20: names, scopes, devices, packages, strings, integers, buffers).
public indirect enum AML: Equatable, Sendable {
    case integer(UInt64)
    case string(String)
    case buffer([UInt8])
    case package([AML])
    /// `Name(NAME, value)`; `name` is a NameString such as "_S5_" or "\\_SB_".
    case name(String, AML)
    /// `Scope(NAME) { ... }`
    case scope(String, [AML])
    /// `Device(NAME) { ... }`
    case device(String, [AML])

    /// The encoded bytes.
    public var bytes: [UInt8] {
        switch self {
        case .integer(let v):
            switch v {
            case 0: return [0x00]                         // ZeroOp
            case 1: return [0x01]                         // OneOp
            case ...0xFF: return [0x0A, UInt8(v)]         // BytePrefix
            case ...0xFFFF: return [0x0B] + LittleEndian.bytes(v, 2)      // WordPrefix
            case ...0xFFFF_FFFF: return [0x0C] + LittleEndian.bytes(v, 4) // DWordPrefix
            default: return [0x0E] + LittleEndian.bytes(v, 8)             // QWordPrefix
            }
        case .string(let s):
            return [0x0D] + Array(s.utf8) + [0]
        case .buffer(let data):
            let body = AML.integer(UInt64(data.count)).bytes + data
            return [0x11] + AML.packageLength(body.count) + body
        case .package(let elements):
            precondition(elements.count < 256)
            let body = [UInt8(elements.count)] + elements.flatMap(\.bytes)
            return [0x12] + AML.packageLength(body.count) + body
        case .name(let name, let value):
            return [0x08] + AML.nameString(name) + value.bytes
        case .scope(let name, let terms):
            let body = AML.nameString(name) + terms.flatMap(\.bytes)
            return [0x10] + AML.packageLength(body.count) + body
        case .device(let name, let terms):
            let body = AML.nameString(name) + terms.flatMap(\.bytes)
            return [0x5B, 0x82] + AML.packageLength(body.count) + body
        }
    }

    /// PkgLength: the length of the package *including* the PkgLength bytes themselves.
    static func packageLength(_ bodyLength: Int) -> [UInt8] {
        if bodyLength + 1 < 0x40 { return [UInt8(bodyLength + 1)] }
        for extra in 1...3 {
            let total = bodyLength + 1 + extra
            if total < 1 << (4 + 8 * extra) {
                var bytes = [UInt8(extra << 6) | UInt8(total & 0xF)]
                for i in 0..<extra { bytes.append(UInt8((total >> (4 + 8 * i)) & 0xFF)) }
                return bytes
            }
        }
        preconditionFailure("AML package too large")
    }

    /// A NameString: an optional root prefix and dot-separated 4-character segments, each padded with '_'.
    static func nameString(_ name: String) -> [UInt8] {
        var rest = Substring(name)
        var prefix: [UInt8] = []
        if rest.hasPrefix("\\") { prefix = [0x5C]; rest = rest.dropFirst() }
        let segments = rest.split(separator: ".").map { segment -> [UInt8] in
            precondition(!segment.isEmpty && segment.count <= 4, "bad AML name segment \(segment)")
            return Array(segment.utf8) + Array(repeating: UInt8(ascii: "_"), count: 4 - segment.count)
        }
        switch segments.count {
        case 0: return prefix + [0x00]
        case 1: return prefix + segments[0]
        case 2: return prefix + [0x2E] + segments[0] + segments[1]        // DualNamePrefix
        default: return prefix + [0x2F, UInt8(segments.count)] + segments.flatMap { $0 } // MultiNamePrefix
        }
    }

    /// A resource template (the buffer `_CRS` returns): the descriptors, then an End Tag with a
    /// zero checksum ("no checksum").
    public static func resources(_ descriptors: [[UInt8]]) -> AML {
        .buffer(descriptors.flatMap { $0 } + [0x79, 0x00])
    }

    /// I/O port descriptor (small item 0x47): 16-bit decode, fixed base, `length` ports.
    public static func ioPortDescriptor(base: UInt16, length: UInt8) -> [UInt8] {
        [0x47, 0x01, UInt8(base & 0xFF), UInt8(base >> 8), UInt8(base & 0xFF), UInt8(base >> 8), 0x01, length]
    }

    /// IRQ descriptor without flags (small item 0x22): an edge-triggered, active-high ISA IRQ.
    public static func irqDescriptor(_ irq: UInt8) -> [UInt8] {
        let mask = UInt16(1) << UInt16(irq)
        return [0x22, UInt8(mask & 0xFF), UInt8(mask >> 8)]
    }

    /// Fixed 32-bit memory range descriptor (large item 0x86), read-write.
    public static func memory32FixedDescriptor(base: UInt32, length: UInt32) -> [UInt8] {
        [0x86, 0x09, 0x00, 0x01] + LittleEndian.bytes(UInt64(base), 4) + LittleEndian.bytes(UInt64(length), 4)
    }

    /// Extended interrupt descriptor (large item 0x89) for one GSI, consumed by the device,
    /// exclusive, active-high; level- or edge-triggered.
    public static func extendedInterruptDescriptor(gsi: UInt32, levelTriggered: Bool) -> [UInt8] {
        let flags: UInt8 = 0x01 | (levelTriggered ? 0 : 0x02) // bit 0 consumer, bit 1 edge
        return [0x89, 0x06, 0x00, flags, 0x01] + LittleEndian.bytes(UInt64(gsi), 4)
    }

    /// A compressed EISA id, as ASL's EisaId("PNP0501") produces: three letters in 5 bits each and
    /// four hex digits, stored big-endian in a 32-bit integer.
    public static func eisaID(_ id: String) -> AML {
        let c = Array(id.utf8)
        precondition(c.count == 7, "EISA ids are 3 letters and 4 hex digits")
        func hex(_ b: UInt8) -> UInt32 { UInt32(b <= 0x39 ? b - 0x30 : (b | 0x20) - 0x61 + 10) }
        let value = (UInt32(c[0] - 0x40) << 26) | (UInt32(c[1] - 0x40) << 21) | (UInt32(c[2] - 0x40) << 16)
            | (hex(c[3]) << 12) | (hex(c[4]) << 8) | (hex(c[5]) << 4) | hex(c[6])
        return .integer(UInt64(value.byteSwapped))
    }
}

