import Glibc
import SwiftletSystem

extension ImageStore {
    /// The read-only guest disk for a layer, converting the layer blob (gzip, zstd or plain tar)
    /// the first time; the uncompressed stream must match `diffID` or no disk is written.
    /// Returns the disk's path and the conversion's warnings (empty when it already existed).
    public func layerDisk(layer: Digest, diffID: Digest) throws(SwiftletError) -> (path: String, warnings: [String]) {
        let path = diskPath(diffID: diffID)
        if access(path, F_OK) == 0 { return (path, []) }
        guard hasBlob(layer) else {
            throw SwiftletError(.notFound, "layer \(layer) is missing from the image store \(root): pull the image again")
        }
        let stream = try LayerStream(path: blobPath(layer))
        let warnings = try LayerConverter.convert(scratchDirectory: root + "/tmp", to: path, beforeCommit: { () throws(SwiftletError) in
            // The tar's end marker may come before the end of the stream: hash the rest too.
            var rest = [UInt8](repeating: 0, count: 65536)
            while try rest.withMutableBytes({ raw throws(SwiftletError) in try stream.read(into: raw) }) > 0 {}
            let actual = stream.uncompressedDigest()
            guard actual == diffID else {
                throw SwiftletError(.invalidFormat, "layer \(layer) does not unpack to its diff ID: expected \(diffID), got \(actual)")
            }
        }, source: { buffer throws(SwiftletError) in try stream.read(into: buffer) })
        return (path, warnings)
    }
}

extension ImageStore {
    public func hasDisk(diffID: Digest) -> Bool { access(diskPath(diffID: diffID), F_OK) == 0 }
}
