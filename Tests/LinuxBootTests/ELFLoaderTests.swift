import GuestMemory
import SwiftletSystem
import Testing
import TestSupport
@testable import LinuxBoot

@Suite struct ELFLoaderTests {
    func parse(_ bytes: [UInt8]) throws(SwiftletError) -> ELFLoader.Image {
        try ELFLoader.parse(bytes, fileSize: UInt64(bytes.count)) { offset, count throws(SwiftletError) in
            Array(bytes[Int(offset)..<Int(offset) + count])
        }
    }

    @Test func parsesEntryAndSegments() throws {
        let code: [UInt8] = [0x90, 0x90, 0xF4]
        let image = try parse(TinyGuest.elf(code: code, address: 0x200000, bssSize: 0x1000))
        #expect(image.entry == 0x200000)
        #expect(image.segments == [ELFLoader.Segment(fileOffset: 120, fileSize: 3, physicalAddress: 0x200000, memorySize: 0x1003)])
        #expect(!image.hasLinuxNote)
    }

    @Test func recognisesLinuxNote() throws {
        #expect(try parse(TinyGuest.elf(code: [0xF4], linuxNote: true)).hasLinuxNote)
    }

    @Test func rejectsWrongClassMachineAndType() {
        var elf = TinyGuest.elf(code: [0xF4])
        elf[4] = 1 // ELFCLASS32
        #expect(throws: SwiftletError.self) { try parse(elf) }
        elf = TinyGuest.elf(code: [0xF4])
        elf[18] = 183 // aarch64
        #expect { try parse(elf) } throws: { ($0 as? SwiftletError)?.message.contains("not x86_64") == true }
        elf = TinyGuest.elf(code: [0xF4])
        elf[16] = 3 // ET_DYN
        #expect { try parse(elf) } throws: { ($0 as? SwiftletError)?.message.contains("ET_EXEC") == true }
    }

    @Test func rejectsTruncatedFiles() {
        let elf = TinyGuest.elf(code: Array(repeating: 0x90, count: 100))
        // The header alone, then a file that ends inside the segment.
        #expect(throws: SwiftletError.self) { try parse(Array(elf.prefix(40))) }
        let short = Array(elf.prefix(elf.count - 10))
        #expect { try parse(short) } throws: { ($0 as? SwiftletError)?.message.contains("truncated") == true }
    }

    @Test func rejectsEntryOutsideSegments() {
        var elf = TinyGuest.elf(code: [0xF4], address: 0x100000)
        elf.replaceSubrange(24..<32, with: TinyGuest.le(0x900000, 8))
        #expect { try parse(elf) } throws: { ($0 as? SwiftletError)?.message.contains("entry point") == true }
    }

    @Test func loadsSegmentsAndZeroesBSS() throws {
        let dir = TemporaryDirectory()
        let path = dir.write("guest.elf", TinyGuest.elf(code: [1, 2, 3, 4], address: 0x100000, bssSize: 16))
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        try memory.write([UInt8](repeating: 0xAA, count: 32), at: GuestAddress(0x100000))
        let kernel = try KernelLoader.load(path: path, into: memory)
        #expect(kernel.format == .elf)
        #expect(kernel.entry == GuestAddress(0x100000))
        #expect(kernel.end == 0x100000 + 4 + 16)
        #expect(try memory.read(count: 24, at: GuestAddress(0x100000)) == [1, 2, 3, 4] + Array(repeating: 0, count: 16) + [0xAA, 0xAA, 0xAA, 0xAA])
    }

    @Test func pageAlignedSegmentsAreMappedAndStayPrivate() throws {
        // Code at file offset 0x1000 for physical 0x200000: the interior pages are mapped, the
        // partial last page copied, the bss zeroed.
        let code = (0..<(2 * 4096 + 300)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        var elf = TinyGuest.elf(code: [], address: 0x200000, bssSize: 0)
        let phoff = 64
        elf.replaceSubrange((phoff + 8)..<(phoff + 16), with: TinyGuest.le(0x1000, 8))           // p_offset
        elf.replaceSubrange((phoff + 32)..<(phoff + 40), with: TinyGuest.le(UInt64(code.count), 8)) // p_filesz
        elf.replaceSubrange((phoff + 40)..<(phoff + 48), with: TinyGuest.le(UInt64(code.count) + 5000, 8)) // p_memsz
        elf += Array(repeating: 0, count: 0x1000 - elf.count) + code + Array(repeating: 0xCC, count: 4096)
        let dir = TemporaryDirectory()
        let path = dir.write("aligned.elf", elf)
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 8 << 20)])
        let kernel = try KernelLoader.load(path: path, into: memory)
        #expect(kernel.end == 0x200000 + UInt64(code.count) + 5000)
        #expect(try memory.read(count: code.count, at: GuestAddress(0x200000)) == code)
        #expect(try memory.read(count: 5000, at: GuestAddress(0x200000 + UInt64(code.count))).allSatisfy { $0 == 0 },
                "bytes after the segment's file part (0xCC in the file) must read as bss zeros")
        try memory.write(UInt32(0xFFFF_FFFF), at: GuestAddress(0x200000))
        #expect(Subprocess.run(["/usr/bin/cmp", path, dir.write("copy.elf", elf)]).status == 0, "the file must not change")
    }

    @Test func segmentOutsideMemoryIsAClearError() throws {
        let dir = TemporaryDirectory()
        let path = dir.write("guest.elf", TinyGuest.elf(code: [0xF4], address: 0x4000000))
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        #expect { try KernelLoader.load(path: path, into: memory) } throws: {
            ($0 as? SwiftletError)?.code == .outOfBounds && ($0 as? SwiftletError)?.message.contains("--memory") == true
        }
    }

    @Test func unknownFormatAndMissingFile() throws {
        let dir = TemporaryDirectory()
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 4 << 20)])
        let junk = dir.write("junk", Array("#!/bin/sh\necho not a kernel\n".utf8))
        #expect { try KernelLoader.load(path: junk, into: memory) } throws: {
            ($0 as? SwiftletError)?.message.contains("neither an ELF vmlinux nor a bzImage") == true
        }
        #expect { try KernelLoader.load(path: dir.path + "/missing", into: memory) } throws: {
            ($0 as? SwiftletError)?.code == .notFound
        }
        #expect { try KernelLoader.load(path: dir.path, into: memory) } throws: {
            ($0 as? SwiftletError)?.message.contains("not a regular file") == true
        }
    }
}
