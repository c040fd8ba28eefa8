import GuestMemory
import SwiftletSystem

/// What the ACPI tables describe: the CPUs, the interrupt controllers, and the VMM's
/// power-off and panic ports.
public struct ACPIConfiguration: Equatable, Sendable {
    public var cpuCount: Int
    /// I/O port of the HW-reduced ACPI sleep control register (power off writes SLP_TYPx | SLP_EN).
    public var sleepControlPort: UInt16
    /// I/O port of the pvpanic device (ACPI id QEMU0001).
    public var pvpanicPort: UInt16
    /// The 16550 UART (PNP0501): its 8 ports and its ISA IRQ (= GSI).
    public var serialPort: UInt16
    public var serialIRQ: UInt8
    /// virtio-mmio devices (ACPI id LNRO0005): register window and level-triggered GSI.
    public var virtioDevices: [VirtioMMIODescription] = []

    public init(cpuCount: Int, sleepControlPort: UInt16, pvpanicPort: UInt16, serialPort: UInt16 = 0x3F8, serialIRQ: UInt8 = 4) {
        self.cpuCount = cpuCount; self.sleepControlPort = sleepControlPort; self.pvpanicPort = pvpanicPort
        self.serialPort = serialPort; self.serialIRQ = serialIRQ
    }

    /// The S5 (soft off) sleep type value the DSDT advertises and the VMM expects.
    public static let softOffSleepType: UInt8 = 5
}

/// Where a virtio-mmio device's registers are and which interrupt it raises.
public struct VirtioMMIODescription: Equatable, Sendable {
    public var base: UInt64
    public var size: UInt64
    public var gsi: UInt32

    public init(base: UInt64, size: UInt64, gsi: UInt32) {
        self.base = base; self.size = size; self.gsi = gsi
    }
}

/// Builds the RSDP, XSDT, FADT, MADT and DSDT of a hardware-reduced ACPI machine.
///
/// Hardware-reduced ACPI (FADT flag HW_REDUCED_ACPI) has no PM1 blocks, PM timer, legacy PIC or
/// SCI: power-off is one write to the sleep control register, and Linux skips the legacy timer
/// and PIC probing it would otherwise do.
public enum ACPITables {
    static let oemID = Array("SWIFTL".utf8)
    static let oemTableID = Array("SWIFTLET".utf8)
    static let creatorID = Array("SWFT".utf8)

    /// Lays the tables out from `base`; returns the bytes and the RSDP's address (== base).
    public static func build(_ config: ACPIConfiguration, base: GuestAddress) -> (bytes: [UInt8], rsdp: GuestAddress) {
        // Layout: RSDP (36, padded to 48) | XSDT | FADT | MADT | DSDT, each 16-byte aligned.
        var blob = [UInt8](repeating: 0, count: 48)
        func append(_ table: [UInt8]) -> UInt64 {
            while blob.count % 16 != 0 { blob.append(0) }
            let at = base.rawValue + UInt64(blob.count)
            blob += table
            return at
        }
        let dsdt = makeDSDT(config)
        let madt = makeMADT(config)
        // The XSDT's size is known before its contents: header + two 8-byte pointers.
        let xsdtAddress = base.rawValue + 48
        let fadtAddress = align16(xsdtAddress + 36 + 16)
        let fadt = makeFADT(config, dsdtAddress: 0) // placeholder to learn its size
        let madtAddress = align16(fadtAddress + UInt64(fadt.count))
        let dsdtAddress = align16(madtAddress + UInt64(madt.count))
        let xsdt = table(signature: "XSDT", revision: 1, body: LittleEndian.bytes(fadtAddress, 8) + LittleEndian.bytes(madtAddress, 8))
        precondition(append(xsdt) == xsdtAddress)
        precondition(append(makeFADT(config, dsdtAddress: dsdtAddress)) == fadtAddress)
        precondition(append(madt) == madtAddress)
        precondition(append(dsdt) == dsdtAddress)
        blob.replaceSubrange(0..<36, with: makeRSDP(xsdtAddress: xsdtAddress))
        return (blob, base)
    }

    static func align16(_ v: UInt64) -> UInt64 { (v + 15) & ~15 }

    /// RSDP revision 2: signature, checksum over the first 20 bytes, extended checksum over all 36.
    static func makeRSDP(xsdtAddress: UInt64) -> [UInt8] {
        var r = Array("RSD PTR ".utf8) + [0] + oemID + [2] + LittleEndian.bytes(0, 4) + LittleEndian.bytes(36, 4)
        r += LittleEndian.bytes(xsdtAddress, 8) + [0, 0, 0, 0]
        r[8] = checksum(r[0..<20])
        r[32] = checksum(r[0..<36])
        return r
    }

    /// A standard 36-byte description header followed by `body`, with its checksum set.
    static func table(signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        let length = 36 + body.count
        var t = Array(signature.utf8) + LittleEndian.bytes(UInt64(length), 4) + [revision, 0] + oemID + oemTableID + LittleEndian.bytes(1, 4)
            + creatorID + LittleEndian.bytes(1, 4)
        t += body
        t[9] = checksum(t[...])
        return t
    }

    /// FADT revision 6 (276 bytes): HW_REDUCED_ACPI, sleep control/status registers in I/O space,
    /// no legacy devices, no VGA, no CMOS RTC probing, no ASPM; the DSDT through X_DSDT.
    static func makeFADT(_ config: ACPIConfiguration, dsdtAddress: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 276 - 36)
        func put(_ value: UInt64, _ offset: Int, _ size: Int) {
            LittleEndian.write(value, size, into: &b, at: offset - 36)
        }
        put(0, 45, 1)                       // Preferred_PM_Profile: unspecified
        put(9, 46, 2)                       // SCI_INT (unused in HW-reduced mode, kept conventional)
        // IAPC_BOOT_ARCH: bit 2 VGA not present, bit 5 CMOS RTC not present.
        put((1 << 2) | (1 << 5), 109, 2)
        // Flags: WBINVD works (bit 0), HW_REDUCED_ACPI (bit 20). No reset register: reboot uses the i8042.
        put((1 << 0) | (1 << 20), 112, 4)
        put(5, 131, 1)                      // FADT minor version (ACPI 6.5)
        put(dsdtAddress, 140, 8)            // X_DSDT
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: Generic Address Structures in system I/O space.
        let gas = [UInt8(1), 8, 0, 1] + LittleEndian.bytes(UInt64(config.sleepControlPort), 8) // space I/O, 8 bits, byte access
        b.replaceSubrange((244 - 36)..<(256 - 36), with: gas)
        b.replaceSubrange((256 - 36)..<(268 - 36), with: gas)
        b.replaceSubrange((268 - 36)..<(276 - 36), with: Array("SWIFTLET".utf8)) // hypervisor vendor identity
        return table(signature: "FACP", revision: 6, body: b)
    }

    /// MADT: one enabled local APIC per vCPU (APIC IDs 0..n-1) and the IOAPIC at GSI base 0.
    static func makeMADT(_ config: ACPIConfiguration) -> [UInt8] {
        var body = LittleEndian.bytes(X86Layout.localAPICAddress, 4) + LittleEndian.bytes(0, 4) // no PCAT_COMPAT: there is no 8259 to use
        for cpu in 0..<config.cpuCount {
            body += [0, 8, UInt8(cpu), UInt8(cpu)] + LittleEndian.bytes(1, 4) // Processor Local APIC, enabled
        }
        body += [1, 12, 0, 0] + LittleEndian.bytes(X86Layout.ioapicAddress, 4) + LittleEndian.bytes(0, 4) // I/O APIC id 0, GSI base 0
        return table(signature: "APIC", revision: 5, body: body)
    }

    /// DSDT: `\_S5` for power-off, the UART (so Linux routes its IRQ), the pvpanic device and the
    /// virtio-mmio devices.
    static func makeDSDT(_ config: ACPIConfiguration) -> [UInt8] {
        let aml: [AML] = [
            .name("\\_S5", .package([.integer(UInt64(ACPIConfiguration.softOffSleepType)), .integer(0)])),
            .scope("\\_SB", [
                .device("COM1", [
                    .name("_HID", AML.eisaID("PNP0501")),
                    .name("_UID", .integer(0)),
                    .name("_CRS", AML.resources([
                        AML.ioPortDescriptor(base: config.serialPort, length: 8),
                        AML.irqDescriptor(config.serialIRQ),
                    ])),
                ]),
                .device("PEVT", [
                    .name("_HID", .string("QEMU0001")),
                    .name("_STA", .integer(0xF)),
                    .name("_CRS", AML.resources([AML.ioPortDescriptor(base: config.pvpanicPort, length: 1)])),
                ]),
            ] + config.virtioDevices.enumerated().map { index, device in
                .device("VR" + (index < 16 ? "0" : "") + String(index, radix: 16, uppercase: true), [
                    .name("_HID", .string("LNRO0005")),
                    .name("_UID", .integer(UInt64(index))),
                    .name("_CCA", .integer(1)), // cache-coherent DMA
                    .name("_CRS", AML.resources([
                        AML.memory32FixedDescriptor(base: UInt32(device.base), length: UInt32(device.size)),
                        AML.extendedInterruptDescriptor(gsi: device.gsi, levelTriggered: true),
                    ])),
                ])
            }),
        ]
        return table(signature: "DSDT", revision: 2, body: aml.flatMap(\.bytes))
    }

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 {
        let sum = bytes.reduce(UInt8(0)) { $0 &+ $1 }
        return 0 &- sum
    }
}

