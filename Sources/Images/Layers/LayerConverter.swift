import Glibc
import SwiftletSystem

/// Turns an uncompressed layer tar into an EROFS disk image the guest mounts read-only.
public enum LayerConverter {
    /// Converts the tar at `tarPath` into an EROFS image at `imagePath`, atomically: the image
    /// appears (by rename) only when complete, so a failure never leaves a half-written one.
    /// Returns the warnings (dropped attributes).
    @discardableResult
    public static func convert(tarPath: String, to imagePath: String, limits: ImportLimits = .current) throws(SwiftletError) -> [String] {
        let input = try OwnedFileDescriptor.openInput(tarPath, role: "layer")
        let fd = input.rawValue
        let directory = imagePath.lastIndex(of: "/").map { String(imagePath[..<$0]) } ?? "."
        return try convert(scratchDirectory: directory, to: imagePath, limits: limits) { buffer throws(SwiftletError) in
            try systemCall("cannot read layer \(tarPath)") { read(fd, buffer.baseAddress, buffer.count) }
        }
    }

    /// Converts the tar stream `source` yields into an EROFS image at `imagePath`, with temporary
    /// files in `scratchDirectory` (on the same file system as `imagePath`). `beforeCommit` runs
    /// after the last entry and before the image appears: a check that throws leaves no image.
    @discardableResult
    public static func convert(
        scratchDirectory: String, to imagePath: String, limits: ImportLimits = .current,
        beforeCommit: () throws(SwiftletError) -> Void = {},
        source: @escaping TarReader.Source
    ) throws(SwiftletError) -> [String] {
        try merge(layers: 1, scratchDirectory: scratchDirectory, to: imagePath, limits: limits,
                  source: { _ throws(SwiftletError) in source }, afterLayer: { _ throws(SwiftletError) in try beforeCommit() })
    }

    /// Merges `layers` tar streams, bottom first, into one EROFS image (see `EROFSBuilder`):
    /// `source(i)` gives layer i's stream, `afterLayer(i)` runs when its last entry is in (a check
    /// that throws leaves no image).
    @discardableResult
    public static func merge(
        layers: Int, scratchDirectory: String, to imagePath: String, limits: ImportLimits = .current,
        source: (Int) throws(SwiftletError) -> TarReader.Source,
        afterLayer: (Int) throws(SwiftletError) -> Void
    ) throws(SwiftletError) -> [String] {
        let builder = try EROFSBuilder(scratchDirectory: scratchDirectory, limits: limits)
        for layer in 0..<layers {
            if layer > 0 { builder.beginLayer() }
            var reader = TarReader(limits: limits, source: try source(layer))
            while let entry = try reader.next() {
                try builder.add(entry) { buffer throws(SwiftletError) in try reader.read(into: buffer) }
            }
            try afterLayer(layer)
        }
        let name = imagePath.split(separator: "/").last.map(String.init) ?? "image"
        let out = try OwnedFileDescriptor.temporaryFile(in: scratchDirectory, prefix: "." + name + ".partial")
        let temporary = out.path
        do {
            let fd = out.descriptor.rawValue
            try builder.write(to: fd)
            try systemCall("cannot set the mode of \(temporary)") { fchmod(fd, 0o644) }
            try systemCall("cannot flush \(temporary)") { fsync(fd) }
            try systemCall("cannot rename \(temporary) to \(imagePath)") { rename(temporary, imagePath) }
        } catch {
            unlink(temporary)
            throw error
        }
        return builder.warnings
    }
}
