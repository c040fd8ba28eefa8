/// Tiny hand-written x86 guests for tests that need KVM but not Linux, and ELF containers for them.
public enum TinyGuest {
    /// `mov dx, port` (64-bit or 32-bit mode: operand-size prefix + imm16).
    public static func movDX(_ port: UInt16) -> [UInt8] { [0x66, 0xBA, UInt8(port & 0xFF), UInt8(port >> 8)] }
    /// `mov al, value`
    public static func movAL(_ value: UInt8) -> [UInt8] { [0xB0, value] }
    /// `out dx, al`
    public static let outDXAL: [UInt8] = [0xEE]
    /// `jmp $` (spin forever)
    public static let spin: [UInt8] = [0xEB, 0xFE]
    /// `ud2`
    public static let ud2: [UInt8] = [0x0F, 0x0B]

    /// 64-bit code that counts in RBX, stores the count at 0x200000 and writes its low byte to
    /// COM1, forever: its console output is 1, 2, 3, ... (mod 256).
    public static let counter: [UInt8] = movDX(0x3F8) + [0x31, 0xDB] // xor ebx, ebx
        + [0x48, 0xFF, 0xC3]                                          // loop: inc rbx
        + [0x48, 0x89, 0x1C, 0x25, 0x00, 0x00, 0x20, 0x00]            // mov [0x200000], rbx
        + [0x88, 0xD8, 0xEE]                                          // mov al, bl; out dx, al
        + [0xEB, 0xF0]                                                // jmp loop

    /// Writes `bytes` one by one to `port`.
    public static func write(_ bytes: [UInt8], port: UInt16) -> [UInt8] {
        movDX(port) + bytes.flatMap { movAL($0) + outDXAL }
    }

    /// 64-bit code: prints `text` on COM1, writes the boot marker, then does `ending`.
    public static func hello(_ text: String, ending: [UInt8]) -> [UInt8] {
        write(Array(text.utf8), port: 0x3F8) + write([123], port: 0x3F0) + ending + spin
    }

    /// Endings that stop a Swiftlet machine.
    public static let i8042Reset = write([0xFE], port: 0x64)
    public static let acpiPowerOff = write([(5 << 2) | 0x20], port: 0x600)
    public static let pvpanic = write([1], port: 0x505)

    /// A minimal ELF64 x86_64 executable with one PT_LOAD segment holding `code` at `address`
    /// (physical = virtual), entry at its first byte, and optionally a "Linux" ELF note.
    public static func elf(code: [UInt8], address: UInt64 = 0x100000, linuxNote: Bool = false, bssSize: UInt64 = 0) -> [UInt8] {
        let note: [UInt8] = linuxNote ? le(6, 4) + le(4, 4) + le(0x101, 4) + Array("Linux\0".utf8) + [0, 0] + le(0, 4) : []
        let phnum = linuxNote ? 2 : 1
        let codeOffset = 64 + 56 * phnum
        let noteOffset = codeOffset + code.count
        var header: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + Array(repeating: 0, count: 8)
        header += le(2, 2) + le(62, 2) + le(1, 4)          // ET_EXEC, EM_X86_64, version
        header += le(address, 8) + le(64, 8) + le(0, 8)     // entry, phoff, shoff
        header += le(0, 4) + le(64, 2) + le(56, 2) + le(UInt64(phnum), 2) + le(64, 2) + le(0, 2) + le(0, 2)
        var ph = le(1, 4) + le(7, 4) + le(UInt64(codeOffset), 8) + le(address, 8) + le(address, 8)
        ph += le(UInt64(code.count), 8) + le(UInt64(code.count) + bssSize, 8) + le(0x1000, 8)
        if linuxNote {
            ph += le(4, 4) + le(4, 4) + le(UInt64(noteOffset), 8) + le(0, 8) + le(0, 8)
            ph += le(UInt64(note.count), 8) + le(UInt64(note.count), 8) + le(4, 8)
        }
        return header + ph + code + note
    }

    /// Little-endian bytes of `value`.
    public static func le(_ value: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8((value >> (8 * UInt64($0))) & 0xFF) }
    }
}
