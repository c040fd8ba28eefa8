import Glibc
import GuestMemory
import SwiftletSystem

/// Loads ELF64 x86_64 executables: each PT_LOAD segment at its physical address, entered at
/// `e_entry` as a physical address (as Linux's vmlinux expects with identity-mapped paging).
public enum ELFLoader {
    static let headerSize = 64
    static let programHeaderSize = 56

    /// One PT_LOAD segment.
    public struct Segment: Equatable, Sendable {
        public var fileOffset: UInt64
        public var fileSize: UInt64
        public var physicalAddress: UInt64
        public var memorySize: UInt64
    }

    /// Parsed header: entry point, loadable segments, and whether it carries Linux ELF notes.
    public struct Image: Equatable, Sendable {
        public var entry: UInt64
        public var segments: [Segment]
        public var hasLinuxNote: Bool
    }

    /// Parses an ELF header and program headers (`bytes` holds the start of the file), checking
    /// every offset against `fileSize`.
    public static func parse(_ bytes: [UInt8], fileSize: UInt64, readNotes: (UInt64, Int) throws(SwiftletError) -> [UInt8]) throws(SwiftletError) -> Image {
        func bad(_ why: String) -> SwiftletError {
            SwiftletError(.invalidFormat, "not a loadable x86_64 ELF kernel: \(why)")
        }
        guard bytes.count >= headerSize else { throw bad("file is shorter than an ELF header") }
        guard bytes[4] == 2 else { throw bad("not a 64-bit ELF (class \(bytes[4]))") }
        guard bytes[5] == 1 else { throw bad("not little-endian") }
        let type = bytes.le(UInt16.self, at: 16)
        let machine = bytes.le(UInt16.self, at: 18)
        guard machine == 62 else { throw bad("built for machine \(machine), not x86_64 (62)") }
        guard type == 2 else { throw bad("ELF type \(type) is not an executable (ET_EXEC)") }
        let entry = bytes.le(UInt64.self, at: 24)
        let phoff = bytes.le(UInt64.self, at: 32)
        let phentsize = Int(bytes.le(UInt16.self, at: 54))
        let phnum = Int(bytes.le(UInt16.self, at: 56))
        guard phentsize == programHeaderSize else { throw bad("program header size \(phentsize), expected 56") }
        guard phnum > 0, phnum < 256 else { throw bad("\(phnum) program headers") }
        let tableEnd = phoff + UInt64(phnum * phentsize)
        guard phoff >= UInt64(headerSize), tableEnd <= fileSize, tableEnd <= UInt64(bytes.count) else {
            throw bad("program header table at \(phoff) lies outside the file")
        }
        var segments: [Segment] = []
        var hasLinuxNote = false
        for i in 0..<phnum {
            let at = Int(phoff) + i * phentsize
            let pType = bytes.le(UInt32.self, at: at)
            let offset = bytes.le(UInt64.self, at: at + 8)
            let paddr = bytes.le(UInt64.self, at: at + 24)
            let filesz = bytes.le(UInt64.self, at: at + 32)
            let memsz = bytes.le(UInt64.self, at: at + 40)
            let (fileEnd, o1) = offset.addingReportingOverflow(filesz)
            guard !o1, fileEnd <= fileSize else { throw bad("segment \(i) extends past the end of the file (truncated?)") }
            switch pType {
            case 1: // PT_LOAD
                guard filesz <= memsz else { throw bad("segment \(i) has file size above memory size") }
                let (_, o2) = paddr.addingReportingOverflow(memsz)
                guard !o2 else { throw bad("segment \(i) wraps the address space") }
                segments.append(Segment(fileOffset: offset, fileSize: filesz, physicalAddress: paddr, memorySize: memsz))
            case 4: // PT_NOTE
                if filesz > 0, filesz < 1 << 16, noteOwners(try readNotes(offset, Int(filesz))).contains("Linux") { hasLinuxNote = true }
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw bad("no loadable segments") }
        guard segments.contains(where: { entry >= $0.physicalAddress && entry < $0.physicalAddress + $0.memorySize }) else {
            throw bad("entry point 0x\(String(entry, radix: 16)) is outside every loadable segment")
        }
        return Image(entry: entry, segments: segments, hasLinuxNote: hasLinuxNote)
    }

    /// Owner names of the notes in an ELF note segment.
    static func noteOwners(_ notes: [UInt8]) -> [String] {
        var owners: [String] = []
        var at = 0
        while at + 12 <= notes.count {
            let nameSize = Int(notes.le(UInt32.self, at: at))
            let descSize = Int(notes.le(UInt32.self, at: at + 4))
            let nameStart = at + 12
            guard nameSize < 256, descSize < 1 << 16, nameStart + nameSize <= notes.count else { break }
            owners.append(String(decoding: notes[nameStart..<nameStart + nameSize].prefix { $0 != 0 }, as: UTF8.self))
            at = nameStart + (nameSize + 3) & ~3
            at += (descSize + 3) & ~3
        }
        return owners
    }

    static func load(file: borrowing OwnedFileDescriptor, size: UInt64, path: String, into memory: GuestMemory) throws(SwiftletError) -> LoadedKernel {
        let head = try file.read(count: Int(min(size, 0x1000)), at: 0, what: "kernel \(path)")
        let fd = file.rawValue
        let image = try parse(head, fileSize: size) { offset, count throws(SwiftletError) in
            var bytes = [UInt8](repeating: 0, count: count)
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
            guard n == count else { throw SwiftletError(.invalidFormat, "kernel \(path) is truncated in its notes") }
            return bytes
        }
        for segment in image.segments {
            let start = GuestAddress(segment.physicalAddress)
            guard memory.contains(start, length: segment.memorySize) else {
                throw SwiftletError(.outOfBounds, "kernel segment at \(start) (\(segment.memorySize >> 10) KiB) does not fit in guest memory: raise --memory")
            }
            try FileLoader.place(file: file, offset: segment.fileOffset, length: segment.fileSize, at: start,
                                 memory: memory, what: "kernel \(path)")
            try memory.fill(zero: segment.memorySize - segment.fileSize, at: start + segment.fileSize)
        }
        let start = image.segments.map(\.physicalAddress).min()!
        let end = image.segments.map { $0.physicalAddress + $0.memorySize }.max()!
        return LoadedKernel(format: .elf, entry: GuestAddress(image.entry), start: start, end: end, setupHeader: nil,
                            isLinux: image.hasLinuxNote, commandLineLimit: 2048, initrdAddressMax: 0x7FFF_FFFF)
    }
}
