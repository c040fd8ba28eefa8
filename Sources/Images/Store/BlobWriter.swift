import Glibc
import SwiftletSystem

/// Streams a blob into the store: bytes go to a file in `tmp/` while being hashed, and `commit`
/// moves the file into `blobs/` only if its digest (and size) are what was expected. Dropped
/// without a commit, it deletes its file: nothing half-written is ever visible as content.
public final class BlobWriter {
    private let store: ImageStore
    private let file: NamedFile
    private var path: String { file.path }
    private let what: String
    private var hasher = SHA256()
    public private(set) var written: Int64 = 0
    private var committed = false

    public init(store: ImageStore, what: String) throws(SwiftletError) {
        self.store = store
        self.what = what
        file = try store.temporaryFile("blob")
    }

    deinit { if !committed { unlink(path) } }

    public func write(_ bytes: UnsafeRawBufferPointer) throws(SwiftletError) {
        hasher.update(bytes)
        try file.descriptor.writeAll(bytes)
        written += Int64(bytes.count)
    }

    /// The digest of what was written so far (for content whose digest is not known in advance).
    func digestSoFar() -> Digest {
        var copy = hasher
        return Digest(bytes: copy.finalize())
    }

    /// Checks the digest (and the size, when known) and moves the blob into place.
    @discardableResult
    public func commit(expected: Digest, size: Int64?) throws(SwiftletError) -> Digest {
        let digest = Digest(bytes: hasher.finalize())
        if let size, size != written {
            throw SwiftletError(.invalidFormat, "\(what) is \(written < size ? "truncated" : "longer than declared"): \(written) bytes, expected \(size)")
        }
        guard digest == expected else {
            throw SwiftletError(.invalidFormat, "\(what) does not match its digest: expected \(expected), got \(digest)")
        }
        let fd = file.descriptor.rawValue
        try systemCall("cannot flush \(path)") { fsync(fd) }
        let destination = store.blobPath(digest)
        try systemCall("cannot move \(what) into the image store") { rename(path, destination) }
        committed = true
        return digest
    }
}
