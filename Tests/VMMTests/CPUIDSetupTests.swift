import Hypervisor
import Devices
import Testing
@testable import VMM

@Suite struct CPUIDSetupTests {
    let supported = [
        CPUIDEntry(function: 1, eax: 0x800F12, ebx: 0x0008_0800, ecx: 0x0000_2000, edx: 0x1789_FBFF),
        CPUIDEntry(function: 4, index: 0, flags: 1, eax: 0x0000_0121),
        CPUIDEntry(function: 0xA, eax: 0x0704_4304, ebx: 0, ecx: 0, edx: 0x603),
        CPUIDEntry(function: 0xB, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
        CPUIDEntry(function: 0xB, index: 1, flags: 1, eax: 4, ebx: 16, ecx: 0x201, edx: 7),
        CPUIDEntry(function: 0x8000_0008, ecx: 0x0000_700F),
    ]

    func leaf(_ entries: [CPUIDEntry], _ function: UInt32, _ index: UInt32 = 0) -> CPUIDEntry {
        entries.first { $0.function == function && $0.index == index }!
    }

    @Test func eachVCPUSeesItsOwnAPICID() {
        for cpu: UInt32 in [0, 3] {
            let e = CPUIDSetup.entries(from: supported, cpu: cpu, count: 4, tscDeadline: true)
            #expect(leaf(e, 1).ebx >> 24 == cpu)
            #expect((leaf(e, 1).ebx >> 16) & 0xFF == 4)
            #expect(leaf(e, 0xB, 0).edx == cpu && leaf(e, 0xB, 1).edx == cpu)
        }
    }

    @Test func topologyIsOneSocketOfSingleThreadCores() {
        let e = CPUIDSetup.entries(from: supported, cpu: 0, count: 6, tscDeadline: false)
        #expect(leaf(e, 0xB, 0).ebx == 1 && leaf(e, 0xB, 0).ecx == 0x100)
        #expect(leaf(e, 0xB, 1).ebx == 6 && leaf(e, 0xB, 1).ecx == 0x201)
        #expect(leaf(e, 0xB, 1).eax == 3)             // ceil(log2(6)) bits of core ID
        #expect(leaf(e, 4).eax >> 26 == 5)            // cores per package - 1
        #expect(leaf(e, 0x8000_0008).ecx & 0xFF == 5)
        #expect((leaf(e, 0x8000_0008).ecx >> 12) & 0xF == 3)
    }

    @Test func hypervisorBitTSCDeadlineAndNoPMU() {
        let e = CPUIDSetup.entries(from: supported, cpu: 0, count: 1, tscDeadline: true)
        #expect(leaf(e, 1).ecx & (1 << 31) != 0)
        #expect(leaf(e, 1).ecx & (1 << 24) != 0)
        #expect(leaf(e, 1).edx & (1 << 28) == 0)      // no HTT with one CPU
        #expect(leaf(e, 0xA) == CPUIDEntry(function: 0xA))
        let without = CPUIDSetup.entries(from: supported, cpu: 0, count: 2, tscDeadline: false)
        #expect(leaf(without, 1).ecx & (1 << 24) == 0)
        #expect(leaf(without, 1).edx & (1 << 28) != 0)
    }
}

@Suite struct PortIOBusTests {
    final class Latch: Devices.PortIODevice, @unchecked Sendable {
        var written: [(UInt16, UInt8)] = []
        func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) { data[0] = UInt8(offset) }
        func write(offset: UInt16, data: UnsafeRawBufferPointer) { written.append((offset, data[0])) }
    }

    @Test func routesByRangeAndReadsAllOnesElsewhere() {
        var bus = PortIOBus()
        let latch = Latch()
        bus.register(latch, base: 0x3F8, length: 8)
        var byte: [UInt8] = [0]
        #expect(byte.withUnsafeMutableBytes { bus.dispatch(port: 0x3FB, isWrite: false, data: $0) })
        #expect(byte == [3])
        byte = [0x42]
        #expect(byte.withUnsafeMutableBytes { bus.dispatch(port: 0x3F8, isWrite: true, data: $0) })
        #expect(latch.written.count == 1 && latch.written[0] == (0, 0x42))
        var word: [UInt8] = [0, 0]
        #expect(!word.withUnsafeMutableBytes { bus.dispatch(port: 0x400, isWrite: false, data: $0) })
        #expect(word == [0xFF, 0xFF])
    }
}
