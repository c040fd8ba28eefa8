import GuestMemory
import Glibc
import Testing
import TestSupport
@testable import LinuxBoot

@Suite struct AMLTests {
    @Test func integersUseTheShortestEncoding() {
        #expect(AML.integer(0).bytes == [0x00])
        #expect(AML.integer(1).bytes == [0x01])
        #expect(AML.integer(5).bytes == [0x0A, 0x05])
        #expect(AML.integer(0x505).bytes == [0x0B, 0x05, 0x05])
        #expect(AML.integer(0x1_0000).bytes == [0x0C, 0x00, 0x00, 0x01, 0x00])
        #expect(AML.integer(1 << 40).bytes == [0x0E, 0, 0, 0, 0, 0, 1, 0, 0])
    }

    @Test func packageLengthCountsItself() {
        #expect(AML.packageLength(0) == [0x01])
        #expect(AML.packageLength(62) == [0x3F])
        // 63 body bytes + 2 length bytes = 65 = 0x41: lead byte 0x40 | low nibble 1, then 0x04.
        #expect(AML.packageLength(63) == [0x41, 0x04])
        // 3000 + 2 = 3002 = 0xBBA: lead 0x40 | 0xA, then 0xBB.
        #expect(AML.packageLength(3000) == [0x4A, 0xBB])
        #expect(AML.packageLength(5000).count == 3)
        #expect(AML.packageLength(100_000).count == 3)
    }

    @Test func namesAreSegmentedAndPadded() {
        #expect(AML.nameString("_S5") == Array("_S5_".utf8))
        #expect(AML.nameString("\\_SB") == [0x5C] + Array("_SB_".utf8))
        #expect(AML.nameString("\\_SB.PCI0") == [0x5C, 0x2E] + Array("_SB_PCI0".utf8))
    }

    @Test func s5PackageEncodesLikeACPICA() {
        // Name (\_S5, Package () { 5, 0 }) as iasl emits it.
        let expected: [UInt8] = [0x08, 0x5C, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x05, 0x02, 0x0A, 0x05, 0x00]
        #expect(AML.name("\\_S5", .package([.integer(5), .integer(0)])).bytes == expected)
    }

    @Test func ioResourceTemplate() {
        // IO (Decode16, 0x0505, 0x0505, 0x01, 0x01) + EndTag, in a Buffer of 10 bytes.
        #expect(AML.resources([AML.ioPortDescriptor(base: 0x505, length: 1)]).bytes ==
                [0x11, 0x0D, 0x0A, 0x0A, 0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01, 0x79, 0x00])
        // IRQNoFlags () {4}
        #expect(AML.irqDescriptor(4) == [0x22, 0x10, 0x00])
    }

    @Test func eisaIDsCompressLikeASL() {
        #expect(AML.eisaID("PNP0501") == .integer(0x0105_D041))
        #expect(AML.eisaID("PNP0A03") == .integer(0x030A_D041))
    }
}

@Suite struct ACPITableTests {
    let config = ACPIConfiguration(cpuCount: 4, sleepControlPort: 0x600, pvpanicPort: 0x505)

    /// The table at guest-physical `address` within `blob` laid out from 0xE0000.
    func table(_ blob: [UInt8], at address: UInt64) -> [UInt8] {
        let offset = Int(address - 0xE0000)
        let length = Int(blob.le(UInt32.self, at: offset + 4))
        return Array(blob[offset..<offset + length])
    }

    func sum(_ bytes: some Sequence<UInt8>) -> UInt8 { bytes.reduce(0, &+) }

    @Test func rsdpPointsAtAnXSDTListingFADTAndMADT() throws {
        let (blob, rsdp) = ACPITables.build(config, base: GuestAddress(0xE0000))
        #expect(rsdp == GuestAddress(0xE0000))
        #expect(Array(blob[0..<8]) == Array("RSD PTR ".utf8))
        #expect(blob[15] == 2)                 // revision
        #expect(sum(blob[0..<20]) == 0)
        #expect(sum(blob[0..<36]) == 0)
        let xsdt = table(blob, at: blob.le(UInt64.self, at: 24))
        #expect(Array(xsdt[0..<4]) == Array("XSDT".utf8))
        #expect(sum(xsdt) == 0)
        let pointers = stride(from: 36, to: xsdt.count, by: 8).map { xsdt.le(UInt64.self, at: $0) }
        #expect(pointers.map { String(decoding: table(blob, at: $0)[0..<4], as: UTF8.self) } == ["FACP", "APIC"])
    }

    @Test func everyTableChecksums() {
        let (blob, _) = ACPITables.build(config, base: GuestAddress(0xE0000))
        let xsdt = table(blob, at: blob.le(UInt64.self, at: 24))
        let fadt = table(blob, at: xsdt.le(UInt64.self, at: 36))
        let dsdt = table(blob, at: fadt.le(UInt64.self, at: 140))
        for t in [xsdt, fadt, table(blob, at: xsdt.le(UInt64.self, at: 44)), dsdt] {
            #expect(sum(t) == 0, "checksum of \(String(decoding: t[0..<4], as: UTF8.self))")
        }
        #expect(Array(dsdt[0..<4]) == Array("DSDT".utf8))
    }

    @Test func fadtIsHardwareReducedWithSleepRegisters() {
        let (blob, _) = ACPITables.build(config, base: GuestAddress(0xE0000))
        let xsdt = table(blob, at: blob.le(UInt64.self, at: 24))
        let fadt = table(blob, at: xsdt.le(UInt64.self, at: 36))
        #expect(fadt.count == 276)
        #expect(fadt[8] == 6)
        #expect(fadt.le(UInt32.self, at: 112) & (1 << 20) != 0)        // HW_REDUCED_ACPI
        #expect(fadt[244] == 1 && fadt[245] == 8)                       // sleep control: I/O space, 8 bits
        #expect(fadt.le(UInt64.self, at: 248) == 0x600)
        #expect(fadt.le(UInt64.self, at: 260) == 0x600)                 // sleep status
    }

    @Test func madtHasOneLocalAPICPerCPUAndTheIOAPIC() {
        let (blob, _) = ACPITables.build(config, base: GuestAddress(0xE0000))
        let xsdt = table(blob, at: blob.le(UInt64.self, at: 24))
        let madt = table(blob, at: xsdt.le(UInt64.self, at: 44))
        #expect(madt.le(UInt32.self, at: 36) == 0xFEE0_0000)
        var at = 44
        var apicIDs: [UInt8] = [], ioapics = 0
        while at < madt.count {
            switch madt[at] {
            case 0:
                apicIDs.append(madt[at + 3])
                #expect(madt.le(UInt32.self, at: at + 4) == 1)
            case 1:
                ioapics += 1
                #expect(madt.le(UInt32.self, at: at + 4) == 0xFEC0_0000)
            default:
                Issue.record("unexpected MADT entry type \(madt[at])")
            }
            at += Int(madt[at + 1])
        }
        #expect(apicIDs == [0, 1, 2, 3])
        #expect(ioapics == 1)
    }

    /// Disassembles the DSDT with ACPICA's own iasl, when installed (CI installs acpica-tools).
    @Test(.enabled(if: access("/usr/bin/iasl", X_OK) == 0, "iasl (acpica-tools) is not installed"))
    func dsdtDisassemblesWithACPICA() throws {
        var config = config
        config.virtioDevices = [VirtioMMIODescription(base: 0xD000_0000, size: 0x1000, gsi: 5),
                                VirtioMMIODescription(base: 0xD000_1000, size: 0x1000, gsi: 6)]
        let (blob, _) = ACPITables.build(config, base: GuestAddress(0xE0000))
        let xsdt = table(blob, at: blob.le(UInt64.self, at: 24))
        let fadt = table(blob, at: xsdt.le(UInt64.self, at: 36))
        let dsdt = table(blob, at: fadt.le(UInt64.self, at: 140))
        let dir = TemporaryDirectory()
        dir.write("dsdt.aml", dsdt)
        let result = Subprocess.run(["/usr/bin/iasl", "-p", dir.path + "/dsdt", "-d", dir.path + "/dsdt.aml"])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let dsl = Subprocess.run(["/bin/cat", dir.path + "/dsdt.dsl"]).stdout
        #expect(dsl.contains("Name (\\_S5, Package (0x02)"))
        #expect(dsl.contains("Device (PEVT)"))
        #expect(dsl.contains("Name (_HID, \"QEMU0001\")"))
        #expect(dsl.contains("0x0505"))
        #expect(dsl.contains("Device (COM1)"))
        #expect(dsl.contains("EisaId (\"PNP0501\")"))
        #expect(dsl.contains("IRQNoFlags ()"))
        // virtio-mmio devices as Linux's virtio_mmio driver matches them (ACPI id LNRO0005).
        #expect(dsl.contains("Device (VR00)") && dsl.contains("Device (VR01)"))
        #expect(dsl.contains("Name (_HID, \"LNRO0005\")"))
        let flat = dsl.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(flat.contains("Memory32Fixed (ReadWrite, 0xD0001000, // Address Base 0x00001000, // Address Length"), "\(dsl)")
        #expect(flat.contains("Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) { 0x00000006, }"), "\(dsl)")
    }
}
