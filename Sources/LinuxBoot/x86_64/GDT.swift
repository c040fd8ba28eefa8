import GuestMemory
import SwiftletSystem

/// A segment descriptor as the CPU caches it, and its 8-byte GDT encoding.
public struct SegmentDescriptor: Equatable, Sendable {
    public var base: UInt32
    /// 20-bit limit (in 4 KiB units when `granularity4K`).
    public var limit: UInt32
    /// Access byte: present, DPL, S, type.
    public var access: UInt8
    /// Flags nibble: G, D/B, L, AVL.
    public var flags: UInt8

    public init(base: UInt32, limit: UInt32, access: UInt8, flags: UInt8) {
        self.base = base; self.limit = limit; self.access = access; self.flags = flags
    }

    public var type: UInt8 { access & 0xF }
    public var isCodeOrData: Bool { access & 0x10 != 0 }
    public var dpl: UInt8 { (access >> 5) & 3 }
    public var present: Bool { access & 0x80 != 0 }
    public var longMode: Bool { flags & 0x2 != 0 }
    public var defaultSize32: Bool { flags & 0x4 != 0 }
    public var granularity4K: Bool { flags & 0x8 != 0 }
    /// The limit in bytes, as the CPU applies it.
    public var byteLimit: UInt32 { granularity4K ? (limit << 12) | 0xFFF : limit }

    /// The 8-byte GDT entry.
    public var encoded: UInt64 {
        var v = UInt64(limit & 0xFFFF)
        v |= UInt64(base & 0xFF_FFFF) << 16
        v |= UInt64(access) << 40
        v |= UInt64((limit >> 16) & 0xF) << 48
        v |= UInt64(flags & 0xF) << 52
        v |= UInt64(base >> 24) << 56
        return v
    }

    /// Decodes an 8-byte GDT entry.
    public init(encoded v: UInt64) {
        base = UInt32((v >> 16) & 0xFF_FFFF) | UInt32((v >> 56) & 0xFF) << 24
        limit = UInt32(v & 0xFFFF) | UInt32((v >> 48) & 0xF) << 16
        access = UInt8((v >> 40) & 0xFF)
        flags = UInt8((v >> 52) & 0xF)
    }
}

/// The boot GDT required by the Linux 64-bit boot protocol: flat __BOOT_CS (0x10) and
/// __BOOT_DS (0x18), plus a TSS (0x20) because VMX will not enter a guest without a usable TR.
public enum BootGDT {
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let tssSelector: UInt16 = 0x20

    public static let code = SegmentDescriptor(base: 0, limit: 0xFFFFF, access: 0x9B, flags: 0xA)  // P, S, exec/read, accessed; G, L
    public static let data = SegmentDescriptor(base: 0, limit: 0xFFFFF, access: 0x93, flags: 0xC)  // P, S, read/write, accessed; G, D/B
    public static let tss = SegmentDescriptor(base: 0, limit: 0x67, access: 0x8B, flags: 0x0)      // P, busy 64-bit TSS

    /// Entries in order: null, null, code, data, TSS (low half), TSS (high half: base bits 32-63 = 0).
    public static var entries: [UInt64] { [0, 0, code.encoded, data.encoded, tss.encoded, 0] }

    /// Writes the GDT and an empty IDT; returns (gdt limit, idt limit).
    public static func write(into memory: GuestMemory) throws(SwiftletError) {
        for (i, entry) in entries.enumerated() {
            try memory.write(entry, at: X86Layout.gdt + UInt64(i * 8))
        }
        try memory.write(UInt64(0), at: X86Layout.idt)
    }

    public static var gdtLimit: UInt16 { UInt16(entries.count * 8 - 1) }
    public static let idtLimit: UInt16 = 7
}
