import GuestMemory
import SwiftletSystem

/// Identity-mapped page tables for entering the kernel in 64-bit mode.
public enum PageTables {
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let largePage: UInt64 = 1 << 7

    /// Writes a PML4, one PDPT and four page directories that identity-map the first 4 GiB with
    /// 2 MiB pages. Returns the value for CR3.
    @discardableResult
    public static func writeIdentityMap(into memory: GuestMemory) throws(SwiftletError) -> UInt64 {
        let directories = Int(X86Layout.identityMappedBytes >> 30)
        try memory.write(X86Layout.pdpt.rawValue | present | writable, at: X86Layout.pml4)
        for gib in 0..<directories {
            let directory = X86Layout.pageDirectories + UInt64(gib) * 0x1000
            try memory.write(directory.rawValue | present | writable, at: X86Layout.pdpt + UInt64(gib) * 8)
            for entry in 0..<512 {
                let physical = (UInt64(gib) << 30) | (UInt64(entry) << 21)
                try memory.write(physical | present | writable | largePage, at: directory + UInt64(entry) * 8)
            }
        }
        return X86Layout.pml4.rawValue
    }
}
