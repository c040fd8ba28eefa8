import GuestMemory
import SwiftletSystem
import Testing
import TestSupport
@testable import LinuxBoot

/// A synthetic bzImage: a setup header, `setupSectors` sectors of setup code, then the payload.
func makeBzImage(version: UInt16 = 0x020F, xloadflags: UInt16 = 0x1, setupSectors: UInt8 = 4,
                 payload: [UInt8] = Array(repeating: 0xCC, count: 4096), initSize: UInt32 = 0x200000,
                 preferred: UInt64 = 0x1000000) -> [UInt8] {
    var image = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512)
    func put(_ value: UInt64, _ offset: Int, _ size: Int) {
        image.replaceSubrange(offset..<offset + size, with: TinyGuest.le(value, size))
    }
    put(UInt64(setupSectors), 0x1F1, 1)
    put(0xAA55, 0x1FE, 2)
    put(0x6A, 0x201, 1)                    // jump: header runs to 0x26C
    put(0x5372_6448, 0x202, 4)             // "HdrS"
    put(UInt64(version), 0x206, 2)
    put(0x01, 0x211, 1)                    // LOADED_HIGH
    put(0x7FFF_FFFF, 0x22C, 4)             // initrd_addr_max
    put(0x1000000, 0x230, 4)               // kernel_alignment
    put(UInt64(xloadflags), 0x236, 2)
    put(2047, 0x238, 4)                    // cmdline_size
    put(preferred, 0x258, 8)
    put(UInt64(initSize), 0x260, 4)
    return image + payload
}

@Suite struct BzImageTests {
    @Test func detectsFormats() {
        #expect(KernelImageFormat.detect(header: makeBzImage()) == .bzImage)
        #expect(KernelImageFormat.detect(header: TinyGuest.elf(code: [0xF4])) == .elf)
        #expect(KernelImageFormat.detect(header: [0x4D, 0x5A] + Array(repeating: 0, count: 1024)) == nil)
        #expect(KernelImageFormat.detect(header: []) == nil)
    }

    @Test func parsesHeader() throws {
        let image = makeBzImage(setupSectors: 3)
        let header = try BzImageLoader.parseHeader(image, fileSize: UInt64(image.count))
        #expect(header.protocolVersion == 0x020F)
        #expect(header.payloadOffset == 4 * 512)
        #expect(header.commandLineSize == 2047)
        #expect(header.bytes.count == 0x26C - 0x1F1)
        #expect(header.bytes[0] == 3)
    }

    @Test func rejectsOldProtocolAndMissing64BitEntry() {
        let old = makeBzImage(version: 0x020A)
        #expect { try BzImageLoader.parseHeader(old, fileSize: UInt64(old.count)) } throws: {
            ($0 as? SwiftletError)?.message.contains("predates 2.12") == true
        }
        let no64 = makeBzImage(xloadflags: 0)
        #expect { try BzImageLoader.parseHeader(no64, fileSize: UInt64(no64.count)) } throws: {
            ($0 as? SwiftletError)?.message.contains("64-bit entry") == true
        }
    }

    @Test func rejectsTruncatedImage() {
        let image = makeBzImage()
        let cut = Array(image.prefix(0x300))
        #expect(throws: SwiftletError.self) { try BzImageLoader.parseHeader(cut, fileSize: UInt64(cut.count)) }
    }

    @Test func loadsPayloadAtOneMegabyteAndEntersAt0x200() throws {
        let dir = TemporaryDirectory()
        let payload = (0..<4096).map { UInt8($0 & 0xFF) }
        let path = dir.write("bzImage", makeBzImage(payload: payload))
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 64 << 20)])
        let kernel = try KernelLoader.load(path: path, into: memory)
        #expect(kernel.format == .bzImage)
        #expect(kernel.entry == GuestAddress(0x100200))
        #expect(kernel.end == 0x1000000 + 0x200000) // preferred address + init_size
        #expect(kernel.commandLineLimit == 2048)
        #expect(try memory.read(count: 4096, at: GuestAddress(0x100000)) == payload)
    }

    @Test func tooLittleMemoryToDecompress() throws {
        let dir = TemporaryDirectory()
        let path = dir.write("bzImage", makeBzImage(initSize: 0x4000000))
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 32 << 20)])
        #expect { try KernelLoader.load(path: path, into: memory) } throws: {
            ($0 as? SwiftletError)?.message.contains("raise --memory") == true
        }
    }
}
