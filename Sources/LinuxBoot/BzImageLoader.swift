import GuestMemory
import SwiftletSystem

/// Loads a Linux bzImage for the 64-bit boot protocol: the protected-mode kernel at 1 MiB,
/// entered at its `startup_64` (load address + 0x200).
public enum BzImageLoader {
    /// What the setup header says, checked.
    public struct Header: Equatable, Sendable {
        public var setupSectors: Int
        public var protocolVersion: UInt16
        public var loadFlags: UInt8
        public var xloadFlags: UInt16
        public var relocatable: Bool
        public var kernelAlignment: UInt32
        public var preferredAddress: UInt64
        public var initSize: UInt32
        public var commandLineSize: UInt32
        public var initrdAddressMax: UInt32
        /// The setup header bytes from 0x1F1 to its end (0x202 + the byte at 0x201).
        public var bytes: [UInt8]

        /// Offset of the protected-mode kernel in the file.
        public var payloadOffset: Int { (setupSectors + 1) * 512 }
    }

    /// Parses and validates the header at the start of a bzImage of `fileSize` bytes.
    public static func parseHeader(_ b: [UInt8], fileSize: UInt64) throws(SwiftletError) -> Header {
        func bad(_ why: String) -> SwiftletError { SwiftletError(.invalidFormat, "bad bzImage: \(why)") }
        guard b.count >= 0x270 else { throw bad("file is shorter than the setup header") }
        let version = b.le(UInt16.self, at: 0x206)
        guard version >= 0x020C else {
            throw bad("boot protocol \(version >> 8).\(version & 0xFF) predates 2.12 and has no 64-bit entry point")
        }
        let xloadflags = b.le(UInt16.self, at: 0x236)
        guard xloadflags & 1 != 0 else { throw bad("kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)") }
        var setupSectors = Int(b[0x1F1])
        if setupSectors == 0 { setupSectors = 4 }
        let headerEnd = 0x202 + Int(b[0x201])
        guard headerEnd <= b.count, headerEnd > 0x202 else { throw bad("setup header length is invalid") }
        let header = Header(
            setupSectors: setupSectors, protocolVersion: version, loadFlags: b[0x211], xloadFlags: xloadflags,
            relocatable: b[0x234] != 0, kernelAlignment: b.le(UInt32.self, at: 0x230),
            preferredAddress: b.le(UInt64.self, at: 0x258), initSize: b.le(UInt32.self, at: 0x260),
            commandLineSize: b.le(UInt32.self, at: 0x238), initrdAddressMax: b.le(UInt32.self, at: 0x22C),
            bytes: Array(b[0x1F1..<headerEnd]))
        guard UInt64(header.payloadOffset) < fileSize else { throw bad("file ends inside the setup code (truncated?)") }
        guard header.loadFlags & 1 != 0 else { throw bad("kernel is not loaded high (zImage is not supported)") }
        return header
    }

    static func load(file: borrowing OwnedFileDescriptor, size: UInt64, header head: [UInt8], path: String,
                     into memory: GuestMemory) throws(SwiftletError) -> LoadedKernel {
        let header = try parseHeader(head, fileSize: size)
        let payloadSize = size - UInt64(header.payloadOffset)
        let load = X86Layout.bzImageLoadAddress
        // The decompressor needs init_size bytes from where the kernel will run (its preferred
        // address unless relocatable), and the compressed payload must not be overwritten early.
        let runStart = header.preferredAddress > load.rawValue ? header.preferredAddress : load.rawValue
        let end = max(load.rawValue + payloadSize, runStart + UInt64(header.initSize))
        guard memory.contains(load, length: end - load.rawValue) else {
            throw SwiftletError(.outOfBounds, "bzImage \(path) needs \((end + (1 << 20) - 1) >> 20) MiB of low guest memory to decompress: raise --memory")
        }
        try FileLoader.place(file: file, offset: UInt64(header.payloadOffset), length: payloadSize, at: load,
                             memory: memory, what: "kernel \(path)")
        return LoadedKernel(format: .bzImage, entry: load + 0x200, start: load.rawValue, end: end, setupHeader: header.bytes,
                            isLinux: true, commandLineLimit: UInt64(max(header.commandLineSize, 255)) + 1,
                            initrdAddressMax: UInt64(header.initrdAddressMax))
    }
}
