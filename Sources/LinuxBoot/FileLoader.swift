import GuestMemory
import SwiftletSystem

/// Puts a range of a file into guest memory: whole pages are mapped copy-on-write (nothing is
/// read until the guest touches it), partial pages at either end are copied.
enum FileLoader {
    static let page: UInt64 = 4096

    static func place(file: borrowing OwnedFileDescriptor, offset: UInt64, length: UInt64, at address: GuestAddress,
                      memory: GuestMemory, what: String) throws(SwiftletError) {
        guard length > 0 else { return }
        // Mappable only when file offset and guest address agree within the page.
        var head = length
        if offset % page == address.rawValue % page {
            head = min(length, (page - address.rawValue % page) % page)
        }
        try copy(file: file, offset: offset, length: head, at: address, memory: memory, what: what)
        let rest = length - head
        guard rest > 0 else { return }
        // Map whole pages; a final partial page is mapped too when it ends the file (the kernel
        // zero-fills past EOF), otherwise copied so no bytes beyond `length` reach the guest.
        let fileSize = try file.size()
        let endsFile = offset + length >= fileSize
        let mapped = endsFile ? rest : rest & ~(page - 1)
        if mapped > 0, try memory.mapFile(descriptor: file.rawValue, offset: offset + head, length: mapped, at: address + head) {
            try copy(file: file, offset: offset + head + mapped, length: rest - mapped, at: address + head + mapped, memory: memory, what: what)
        } else {
            try copy(file: file, offset: offset + head, length: rest, at: address + head, memory: memory, what: what)
        }
    }

    static func copy(file: borrowing OwnedFileDescriptor, offset: UInt64, length: UInt64, at address: GuestAddress,
                     memory: GuestMemory, what: String) throws(SwiftletError) {
        guard length > 0 else { return }
        let result = try memory.withBuffer(at: address, count: Int(length)) { buffer throws(SwiftletError) in
            try file.read(into: buffer, at: offset, what: what)
        }
        try result.get()
    }
}
