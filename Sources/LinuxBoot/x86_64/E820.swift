import GuestMemory

/// One entry of the BIOS e820 memory map the kernel reads from the zero page.
public struct E820Entry: Equatable, Sendable {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
        case acpiReclaimable = 3
    }
    public var start: UInt64
    public var size: UInt64
    public var kind: Kind

    public init(start: UInt64, size: UInt64, kind: Kind) {
        self.start = start; self.size = size; self.kind = kind
    }
}

public enum E820 {
    /// The zero page holds at most this many entries.
    public static let maxEntries = 128

    /// The memory map for guest RAM `regions`: conventional memory below the EBDA, the EBDA and
    /// BIOS area (where the ACPI tables live) reserved, then RAM from 1 MiB and above 4 GiB.
    public static func map(for regions: [GuestMemory.Region]) -> [E820Entry] {
        var entries: [E820Entry] = []
        for region in regions {
            let start = region.start.rawValue, end = region.end
            if start < X86Layout.biosAreaEnd {
                entries.append(E820Entry(start: start, size: min(end, X86Layout.ebdaStart) - start, kind: .ram))
                if end > X86Layout.ebdaStart {
                    entries.append(E820Entry(start: X86Layout.ebdaStart, size: min(end, X86Layout.biosAreaEnd) - X86Layout.ebdaStart, kind: .reserved))
                }
                if end > X86Layout.biosAreaEnd {
                    entries.append(E820Entry(start: X86Layout.biosAreaEnd, size: end - X86Layout.biosAreaEnd, kind: .ram))
                }
            } else {
                entries.append(E820Entry(start: start, size: end - start, kind: .ram))
            }
        }
        return entries
    }
}
