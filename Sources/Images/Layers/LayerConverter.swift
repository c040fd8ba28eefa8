import Glibc
import SwiftletSystem

/// Turns an uncompressed layer tar into an EROFS disk image the guest mounts read-only.
public enum LayerConverter {
    /// Converts the tar at `tarPath` into an EROFS image at `imagePath`, atomically: the image
    /// appears (by rename) only when complete, so a failure never leaves a half-written one.
    /// Returns the warnings (dropped attributes).
    @discardableResult
    public static func convert(tarPath: String, to imagePath: String) throws(SwiftletError) -> [String] {
        let input = try OwnedFileDescriptor.openInput(tarPath, role: "layer")
        let fd = input.rawValue
        var reader = TarReader { buffer throws(SwiftletError) in
            try systemCall("cannot read layer \(tarPath)") { read(fd, buffer.baseAddress, buffer.count) }
        }
        let directory = imagePath.lastIndex(of: "/").map { String(imagePath[..<$0]) } ?? "."
        let builder = try EROFSBuilder(scratchDirectory: directory)
        while let entry = try reader.next() {
            try builder.add(entry) { buffer throws(SwiftletError) in try reader.read(into: buffer) }
        }
        let temporary = imagePath + ".partial"
        let out = try OwnedFileDescriptor.open(temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644, what: "image")
        do {
            try builder.write(to: out.rawValue)
            try systemCall("cannot flush \(temporary)") { fsync(out.rawValue) }
            try systemCall("cannot rename \(temporary)") { rename(temporary, imagePath) }
        } catch {
            unlink(temporary)
            throw error
        }
        return builder.warnings
    }
}
