import Glibc
import GuestMemory
import SwiftletSystem

/// A kernel file, recognised by its contents.
public enum KernelImageFormat: Equatable, Sendable, CustomStringConvertible {
    /// An uncompressed ELF64 x86_64 executable (Linux's `vmlinux`, or any freestanding ELF).
    case elf
    /// A Linux bzImage (boot protocol `HdrS` header).
    case bzImage

    public var description: String {
        switch self {
        case .elf: return "ELF vmlinux"
        case .bzImage: return "bzImage"
        }
    }

    /// Recognises `header`, the first bytes of the file (at least 0x240 for a bzImage).
    public static func detect(header: [UInt8]) -> KernelImageFormat? {
        if header.count >= 4, header[0] == 0x7F, header[1] == 0x45, header[2] == 0x4C, header[3] == 0x46 { return .elf }
        if header.count >= 0x206, header[0x1FE] == 0x55, header[0x1FF] == 0xAA,
           header[0x202] == 0x48, header[0x203] == 0x64, header[0x204] == 0x72, header[0x205] == 0x53 { return .bzImage }
        return nil
    }
}

/// Where a loaded kernel sits and how to enter it.
public struct LoadedKernel: Equatable, Sendable {
    public var format: KernelImageFormat
    /// Guest-physical 64-bit entry point.
    public var entry: GuestAddress
    /// Lowest and one-past-highest guest-physical byte the kernel occupies or needs before it
    /// reads the memory map (bzImage: up to the end of its decompression area).
    public var start: UInt64
    public var end: UInt64
    /// For a bzImage, the setup header bytes to copy into the zero page at 0x1F1.
    public var setupHeader: [UInt8]?
    /// Whether the image carries Linux's own ELF notes or boot header (vs. a freestanding test guest).
    public var isLinux: Bool
    /// Longest command line the kernel accepts, including the terminating NUL.
    public var commandLineLimit: UInt64
    /// Highest address the initrd may end at, as the kernel states it.
    public var initrdAddressMax: UInt64
}

/// Loads kernel images into guest memory.
public enum KernelLoader {
    /// Reads `path`, recognises its format and loads it.
    public static func load(path: String, into memory: GuestMemory) throws(SwiftletError) -> LoadedKernel {
        let file = try OwnedFileDescriptor.openInput(path, role: "kernel", hint: "pass --kernel PATH, or build the guest kernel with `make kernel`")
        let size = try file.size()
        let headerBytes = try file.read(count: Int(min(size, 0x1000)), at: 0, what: "kernel \(path)")
        switch KernelImageFormat.detect(header: headerBytes) {
        case .elf?:
            return try ELFLoader.load(file: file, size: size, path: path, into: memory)
        case .bzImage?:
            return try BzImageLoader.load(file: file, size: size, header: headerBytes, path: path, into: memory)
        case nil:
            throw SwiftletError(.invalidFormat, "\(path) is neither an ELF vmlinux nor a bzImage: pass a Linux kernel image (arch/x86/boot/bzImage or vmlinux)")
        }
    }
}

extension [UInt8] {
    /// Little-endian integer at `offset`; the caller has checked the bounds.
    func le<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        T(truncatingIfNeeded: LittleEndian.read(self, at: offset, count: MemoryLayout<T>.size))
    }
}
