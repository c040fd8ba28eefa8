import GuestMemory
import SwiftletSystem
import Testing
import TestSupport
@testable import LinuxBoot

@Suite struct BootStructureTests {
    @Test func e820ForSmallMemoryReservesEBDAAndBIOSArea() throws {
        let memory = try GuestMemory(anonymous: X86Layout.ramRanges(bytes: 256 << 20))
        #expect(E820.map(for: memory.regions) == [
            E820Entry(start: 0, size: 0x9FC00, kind: .ram),
            E820Entry(start: 0x9FC00, size: 0x100000 - 0x9FC00, kind: .reserved),
            E820Entry(start: 0x100000, size: (256 << 20) - 0x100000, kind: .ram),
        ])
    }

    @Test func largeMemorySkipsTheMMIOGap() {
        let ranges = X86Layout.ramRanges(bytes: 4 << 30)
        #expect(ranges.count == 2)
        #expect(ranges[0].0 == GuestAddress(0) && ranges[0].1 == X86Layout.mmioGapStart)
        #expect(ranges[1].0 == GuestAddress(1 << 32) && ranges[1].1 == (4 << 30) - X86Layout.mmioGapStart)
        let regions = ranges.map { GuestMemory.Region(start: $0.0, size: $0.1, hostAddress: UnsafeMutableRawPointer(bitPattern: 0x1000)!) }
        let map = E820.map(for: regions)
        #expect(map.last == E820Entry(start: 1 << 32, size: (4 << 30) - X86Layout.mmioGapStart, kind: .ram))
        #expect(!map.contains { $0.kind == .ram && $0.start < X86Layout.mmioGapEnd && $0.start + $0.size > X86Layout.mmioGapStart })
    }

    @Test func pageTablesIdentityMapFourGigabytes() throws {
        let memory = try GuestMemory(anonymous: [(GuestAddress(0), 1 << 20)])
        let cr3 = try PageTables.writeIdentityMap(into: memory)
        #expect(cr3 == 0x9000)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x9000)) == 0xA000 | 3)
        for gib in 0..<4 {
            let pd = 0xB000 + UInt64(gib) * 0x1000
            #expect(try memory.read(UInt64.self, at: GuestAddress(0xA000 + UInt64(gib) * 8)) == pd | 3)
            #expect(try memory.read(UInt64.self, at: GuestAddress(pd)) == UInt64(gib) << 30 | 0x83)
            #expect(try memory.read(UInt64.self, at: GuestAddress(pd + 511 * 8)) == (UInt64(gib) << 30 | 511 << 21) | 0x83)
        }
        #expect(try memory.read(UInt64.self, at: GuestAddress(0xA000 + 4 * 8)) == 0)
    }

    @Test func gdtEntriesMatchTheBootProtocol() throws {
        #expect(BootGDT.code.encoded == 0x00AF_9B00_0000_FFFF)
        #expect(BootGDT.data.encoded == 0x00CF_9300_0000_FFFF)
        #expect(BootGDT.entries[Int(BootGDT.codeSelector) / 8] == BootGDT.code.encoded)
        #expect(BootGDT.entries[Int(BootGDT.dataSelector) / 8] == BootGDT.data.encoded)
        #expect(SegmentDescriptor(encoded: BootGDT.tss.encoded) == BootGDT.tss)
        #expect(BootGDT.code.longMode && BootGDT.code.byteLimit == 0xFFFF_FFFF && !BootGDT.code.defaultSize32)
        #expect(BootGDT.data.defaultSize32 && !BootGDT.data.longMode)
    }

    @Test func zeroPageForELFKernel() throws {
        let kernel = LoadedKernel(format: .elf, entry: GuestAddress(0x1000000), start: 0x1000000, end: 0x2000000, setupHeader: nil,
                                  isLinux: true, commandLineLimit: 2048, initrdAddressMax: 0x7FFF_FFFF)
        var page = ZeroPage(kernel: kernel)
        page.setCommandLine(address: GuestAddress(0x20000), length: 10)
        page.setInitrd(address: GuestAddress(0x0F00_0000), size: 0x12345)
        page.setRSDP(GuestAddress(0xE0000))
        try page.setE820([E820Entry(start: 0, size: 0x9FC00, kind: .ram)])
        #expect(page.bytes[0x1FE] == 0x55 && page.bytes[0x1FF] == 0xAA)
        #expect(Array(page.bytes[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(page.typeOfLoader == 0xFF)
        #expect(page.commandLineAddress == 0x20000)
        #expect(page.initrdAddress == 0x0F00_0000 && page.initrdSize == 0x12345)
        #expect(page.rsdpAddress == 0xE0000)
        #expect(page.e820 == [E820Entry(start: 0, size: 0x9FC00, kind: .ram)])
        #expect(page.bytes[0x211] & 0x01 != 0) // LOADED_HIGH
        #expect(throws: SwiftletError.self) {
            try page.setE820(Array(repeating: E820Entry(start: 0, size: 1, kind: .ram), count: 129))
        }
    }

    @Test func zeroPageKeepsTheBzImageSetupHeader() {
        let image = makeBzImage()
        let header = Array(image[0x1F1..<0x26C])
        let kernel = LoadedKernel(format: .bzImage, entry: GuestAddress(0x100200), start: 0x100000, end: 0x1200000,
                                  setupHeader: header, isLinux: true, commandLineLimit: 2048, initrdAddressMax: 0x7FFF_FFFF)
        let page = ZeroPage(kernel: kernel)
        #expect(page.bytes[0x206] == 0x0F && page.bytes[0x207] == 0x02) // version from the image
        #expect(page.bytes[0x238] == 0xFF && page.bytes[0x239] == 0x07)   // cmdline_size from the image
        #expect(page.typeOfLoader == 0xFF)
    }
}
