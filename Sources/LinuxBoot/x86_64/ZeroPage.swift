import GuestMemory
import SwiftletSystem

/// `struct boot_params` (the "zero page") of the Linux x86 boot protocol: the setup header,
/// the e820 map, the command line and initrd locations, and the RSDP address.
public struct ZeroPage: Equatable, Sendable {
    public static let size = 4096

    // Offsets in struct boot_params (Documentation/arch/x86/zero-page.rst, boot.rst).
    static let acpiRSDPAddress = 0x070
    static let extRamdiskImage = 0x0C0
    static let extRamdiskSize = 0x0C4
    static let extCmdLinePtr = 0x0C8
    static let e820Entries = 0x1E8
    static let setupHeader = 0x1F1
    static let bootFlag = 0x1FE
    static let headerMagic = 0x202
    static let protocolVersion = 0x206
    static let typeOfLoader = 0x210
    static let loadFlags = 0x211
    static let ramdiskImage = 0x218
    static let ramdiskSize = 0x21C
    static let heapEndPtr = 0x224
    static let cmdLinePtr = 0x228
    static let kernelAlignment = 0x230
    static let cmdlineSize = 0x238
    static let e820Table = 0x2D0

    public private(set) var bytes = [UInt8](repeating: 0, count: ZeroPage.size)

    /// A zero page for `kernel`: its own setup header for a bzImage, a minimal one for an ELF kernel.
    public init(kernel: LoadedKernel) {
        if let header = kernel.setupHeader {
            bytes.replaceSubrange(Self.setupHeader..<Self.setupHeader + header.count, with: header)
        } else {
            put(0xAA55, Self.bootFlag, 2)
            put(0x5372_6448, Self.headerMagic, 4)     // "HdrS"
            put(0x020F, Self.protocolVersion, 2)
            put(0x0100_0000, Self.kernelAlignment, 4)
        }
        put(0xFF, Self.typeOfLoader, 1)               // undefined boot loader
        put(UInt64(bytes[Self.loadFlags] | 0x01 | 0x80), Self.loadFlags, 1) // LOADED_HIGH | CAN_USE_HEAP
        put(0xFE00, Self.heapEndPtr, 2)
    }

    mutating func put(_ value: UInt64, _ offset: Int, _ size: Int) {
        LittleEndian.write(value, size, into: &bytes, at: offset)
    }

    func value(_ offset: Int, _ size: Int) -> UInt64 {
        LittleEndian.read(bytes, at: offset, count: size)
    }

    public mutating func setCommandLine(address: GuestAddress, length: Int) {
        put(address.rawValue & 0xFFFF_FFFF, Self.cmdLinePtr, 4)
        put(address.rawValue >> 32, Self.extCmdLinePtr, 4)
        put(UInt64(length), Self.cmdlineSize, 4)
    }

    public mutating func setInitrd(address: GuestAddress, size: UInt64) {
        put(address.rawValue & 0xFFFF_FFFF, Self.ramdiskImage, 4)
        put(address.rawValue >> 32, Self.extRamdiskImage, 4)
        put(size & 0xFFFF_FFFF, Self.ramdiskSize, 4)
        put(size >> 32, Self.extRamdiskSize, 4)
    }

    public mutating func setRSDP(_ address: GuestAddress) {
        put(address.rawValue, Self.acpiRSDPAddress, 8)
    }

    public mutating func setE820(_ entries: [E820Entry]) throws(SwiftletError) {
        guard entries.count <= E820.maxEntries else {
            throw SwiftletError(.invalidArgument, "memory map has \(entries.count) entries, the zero page holds \(E820.maxEntries)")
        }
        put(UInt64(entries.count), Self.e820Entries, 1)
        for (i, entry) in entries.enumerated() {
            let at = Self.e820Table + i * 20
            put(entry.start, at, 8)
            put(entry.size, at + 8, 8)
            put(UInt64(entry.kind.rawValue), at + 16, 4)
        }
    }

    // Read-back accessors, for tests and diagnostics.
    public var commandLineAddress: UInt64 { value(Self.cmdLinePtr, 4) | value(Self.extCmdLinePtr, 4) << 32 }
    public var initrdAddress: UInt64 { value(Self.ramdiskImage, 4) | value(Self.extRamdiskImage, 4) << 32 }
    public var initrdSize: UInt64 { value(Self.ramdiskSize, 4) | value(Self.extRamdiskSize, 4) << 32 }
    public var rsdpAddress: UInt64 { value(Self.acpiRSDPAddress, 8) }
    public var typeOfLoader: UInt8 { bytes[Self.typeOfLoader] }
    public var e820: [E820Entry] {
        (0..<Int(bytes[Self.e820Entries])).map { i in
            let at = Self.e820Table + i * 20
            return E820Entry(start: value(at, 8), size: value(at + 8, 8), kind: E820Entry.Kind(rawValue: UInt32(value(at + 16, 4))) ?? .reserved)
        }
    }
}
