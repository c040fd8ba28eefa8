import GuestMemory
import SwiftletSystem

/// Reads a range of a file straight into guest memory.
///
/// Copying, rather than mapping the file copy-on-write, keeps guest RAM one anonymous,
/// 2 MiB-aligned mapping that the host can back with huge pages: the guest kernel then runs from
/// 2 MiB second-level pages instead of 4 KiB page-cache pages, and a boot measured faster that way
/// than with the file mapped (docs/design-notes.md) even after paying for the copy.
enum FileLoader {
    static func place(file: borrowing OwnedFileDescriptor, offset: UInt64, length: UInt64, at address: GuestAddress,
                      memory: GuestMemory, what: String) throws(SwiftletError) {
        guard length > 0 else { return }
        let result = try memory.withBuffer(at: address, count: Int(length)) { buffer throws(SwiftletError) in
            try file.read(into: buffer, at: offset, what: what)
        }
        try result.get()
    }
}
