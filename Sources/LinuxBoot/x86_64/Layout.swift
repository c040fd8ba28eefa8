import GuestMemory

/// Where Swiftlet puts things in an x86_64 guest's physical address space.
///
/// Low memory holds the boot structures; RAM runs from 0 up to `mmioGapStart` and resumes at 4 GiB
/// when the guest has more than that; the gap holds device MMIO, the IOAPIC and the local APIC.
public enum X86Layout {
    /// GDT (a few descriptors) and an empty IDT.
    public static let gdt = GuestAddress(0x500)
    public static let idt = GuestAddress(0x520)
    /// `struct boot_params`, the "zero page".
    public static let zeroPage = GuestAddress(0x7000)
    /// The boot CPU's initial stack pointer.
    public static let bootStack: UInt64 = 0x8FF0
    /// Identity-mapping page tables: PML4, PDPT, then four page directories (4 GiB in 2 MiB pages).
    public static let pml4 = GuestAddress(0x9000)
    public static let pdpt = GuestAddress(0xA000)
    public static let pageDirectories = GuestAddress(0xB000)
    /// Bytes of guest-physical space the boot page tables identity-map.
    public static let identityMappedBytes: UInt64 = 4 << 30
    /// The kernel command line.
    public static let commandLine = GuestAddress(0x20000)
    public static let commandLineMax: UInt64 = 0x10000
    /// Extended BIOS data area: reserved in the e820 map, as on a PC.
    public static let ebdaStart: UInt64 = 0x9FC00
    /// ACPI tables live in the BIOS area, where the kernel also scans for the RSDP.
    public static let acpiTables = GuestAddress(0xE0000)
    public static let biosAreaEnd: UInt64 = 0x100000
    /// Where the protected-mode part of a bzImage is loaded.
    public static let bzImageLoadAddress = GuestAddress(0x100000)
    /// Start of the hole below 4 GiB kept free of RAM for devices.
    public static let mmioGapStart: UInt64 = 0xD000_0000
    public static let mmioGapEnd: UInt64 = 0x1_0000_0000
    /// Where virtio-mmio devices go (inside the gap).
    public static let virtioMMIOBase: UInt64 = 0xD000_0000
    public static let ioapicAddress: UInt64 = 0xFEC0_0000
    public static let localAPICAddress: UInt64 = 0xFEE0_0000
    /// Intel VMX's real-mode TSS (3 pages) and identity page (1 page), just below the BIOS ROM.
    public static let vmxTSS: UInt64 = 0xFFFB_D000
    public static let vmxIdentityMap: UInt64 = 0xFFFB_C000

    /// The guest-physical RAM ranges for `bytes` of memory.
    public static func ramRanges(bytes: UInt64) -> [(GuestAddress, UInt64)] {
        if bytes <= mmioGapStart { return [(GuestAddress(0), bytes)] }
        return [(GuestAddress(0), mmioGapStart), (GuestAddress(mmioGapEnd), bytes - mmioGapStart)]
    }
}
