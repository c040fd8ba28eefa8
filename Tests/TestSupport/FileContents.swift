import Glibc
import SwiftletSystem

/// A file's bytes as read once, to check later that nothing wrote to it. Compared with memcmp:
/// hashing a guest's memory file with a debug build is slow, and slower still in the nested test
/// host's emulated CPU.
public struct FileContents: Equatable {
    public let path: String
    let bytes: [UInt8]

    public init(_ path: String, limit: Int = 1 << 30) throws {
        self.path = path
        bytes = try OwnedFileDescriptor.readSmallFile(path, limit: limit)
    }

    /// Whether the file holds the same bytes as when it was read.
    public func isUnchanged() throws -> Bool {
        try self == FileContents(path, limit: max(bytes.count + 1, 1))
    }

    public static func == (a: FileContents, b: FileContents) -> Bool {
        a.bytes.count == b.bytes.count && a.bytes.withUnsafeBytes { x in
            b.bytes.withUnsafeBytes { y in x.count == 0 || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 }
        }
    }
}
