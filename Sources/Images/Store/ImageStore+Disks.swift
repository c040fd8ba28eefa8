import Glibc
import SwiftletSystem

extension ImageStore {
    /// The most disks an image's layers take in a guest (virtio disks are finite): above it, the
    /// topmost layers share the last disk. A machine has 19 virtio slots: 14 layer disks, its own
    /// disk, and the entropy, vsock, network and balloon devices.
    public static let maximumLayerDisks = 14

    /// The key of the disk holding `diffIDs` merged (bottom first): the OCI chain ID of the
    /// sequence, so a single layer's key is its diff ID.
    public static func diskKey(_ diffIDs: ArraySlice<Digest>) -> Digest {
        var chain = diffIDs.first!
        for diffID in diffIDs.dropFirst() { chain = Digest.of(Array("\(chain) \(diffID)".utf8)) }
        return chain
    }

    /// Which layers each of an image's disks holds: one disk per layer, except that the layers
    /// from the `maximum`th up share the last disk.
    public static func diskGroups(layerCount: Int, maximum: Int = maximumLayerDisks) -> [Range<Int>] {
        guard layerCount > maximum else { return (0..<layerCount).map { $0..<$0 + 1 } }
        return (0..<maximum - 1).map { $0..<$0 + 1 } + [(maximum - 1)..<layerCount]
    }

    /// The image's read-only guest disks, bottom first, converting (or merging) what is missing;
    /// `progress` hears of each conversion and of its warnings.
    public func disks(for image: StoredImage, progress: (String) -> Void = { _ in }) throws(SwiftletError) -> [String] {
        var paths: [String] = []
        for group in Self.diskGroups(layerCount: image.layers.count) {
            let path = diskPath(diffID: Self.diskKey(image.diffIDs[group]))
            if access(path, F_OK) != 0 {
                let which = group.count == 1 ? "layer \(group.lowerBound + 1)" : "layers \(group.lowerBound + 1)–\(group.upperBound) (merged)"
                progress("converting \(which) of \(image.layers.count)")
                for warning in try convert(layers: Array(image.layers[group]), diffIDs: Array(image.diffIDs[group]), to: path) {
                    progress("warning: \(warning)")
                }
            }
            paths.append(path)
        }
        return paths
    }

    /// The read-only guest disk for a layer, converting the layer blob (gzip, zstd or plain tar)
    /// the first time; the uncompressed stream must match `diffID` or no disk is written.
    /// Returns the disk's path and the conversion's warnings (empty when it already existed).
    public func layerDisk(layer: Digest, diffID: Digest) throws(SwiftletError) -> (path: String, warnings: [String]) {
        let path = diskPath(diffID: diffID)
        if access(path, F_OK) == 0 { return (path, []) }
        let warnings = try convert(layers: [layer], diffIDs: [diffID], to: path)
        return (path, warnings)
    }

    @discardableResult
    private func convert(layers: [Digest], diffIDs: [Digest], to path: String) throws(SwiftletError) -> [String] {
        for layer in layers where !hasBlob(layer) {
            throw SwiftletError(.notFound, "layer \(layer) is missing from the image store \(root): pull the image again")
        }
        var current: LayerStream?
        let limits = ImportLimits.current
        return try LayerConverter.merge(layers: layers.count, scratchDirectory: root + "/tmp", to: path, limits: limits, source: { index throws(SwiftletError) in
            let stream = try LayerStream(path: blobPath(layers[index]), limit: limits.maxLayerBytes)
            current = stream
            return { buffer throws(SwiftletError) in try stream.read(into: buffer) }
        }, afterLayer: { index throws(SwiftletError) in
            guard let stream = current else { return }
            // The tar's end marker may come before the end of the stream: hash the rest too.
            var rest = [UInt8](repeating: 0, count: 65536)
            while try rest.withMutableBytes({ raw throws(SwiftletError) in try stream.read(into: raw) }) > 0 {}
            let actual = stream.uncompressedDigest()
            guard actual == diffIDs[index] else {
                throw SwiftletError(.invalidFormat, "layer \(layers[index]) does not unpack to its diff ID: expected \(diffIDs[index]), got \(actual)")
            }
        })
    }

    public func hasDisk(diffID: Digest) -> Bool { access(diskPath(diffID: diffID), F_OK) == 0 }
}
