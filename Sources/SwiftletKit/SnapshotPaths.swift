import Glibc
import Images
import SwiftletSystem
import VMM

/// The host files a snapshot may make Swiftlet open: its read-only disks (image layers) and, for
/// a machine's snapshot, the layers and kernel of the machine record it carries. A snapshot names
/// them by path, and a snapshot directory is untrusted input (it may come from another user or
/// host, or have been altered), so such a path is never used as it is: an image layer is found
/// by its digest (the `disks/sha256/HEX.erofs` name the image store gives it) in this user's
/// image store, and the default image and kernel at Swiftlet's own asset paths. Anything else
/// (a `--rootfs` file, a `--kernel` path, `/dev/sda`, `../x`) is refused with an error naming it.
/// The machine store (`$SWIFTLET_HOME/machines`) is the user's own: its records are trusted.
enum SnapshotPaths {
    /// The read-only disks of a snapshot, resolved as `layerDisk` does.
    static let resolver = SnapshotDiskResolver { path throws(SwiftletError) in try layerDisk(path) }

    /// `resolver`, and also the layers of a machine's own (trusted) record as they are; for a
    /// machine made from a pack (`pack` its unpacked directory), the pack's disks first.
    static func resolver(trusting record: MachineRecord, pack: String? = nil) -> SnapshotDiskResolver {
        let own = Set(record.layers)
        let packed = pack.map { MachinePack.Unpacked.readOnlyDisks(unpackedAt: $0) }
        return SnapshotDiskResolver { path throws(SwiftletError) in
            if own.contains(path) { return path }
            if let packed, let file = try? packed.resolve(path) { return file }
            return try layerDisk(path)
        }
    }

    /// What a read-only disk path a snapshot recorded names, by its form alone: an image layer
    /// (`.../disks/sha256/HEX.erofs`, by its diff ID) or Swiftlet's default image; nil for
    /// anything else.
    enum RecordedDisk: Equatable {
        case layer(Digest)
        case defaultImage

        init?(_ recorded: String) {
            let parts = recorded.split(separator: "/", omittingEmptySubsequences: false)
            if parts.count >= 3, parts[parts.count - 3] == "disks", parts[parts.count - 2] == "sha256", parts.last!.hasSuffix(".erofs"),
               let diffID = try? Digest(parsing: "sha256:" + parts.last!.dropLast(".erofs".count)) {
                self = .layer(diffID)
            } else if recorded.hasSuffix("/images/default/rootfs.erofs"), !recorded.contains("/../") {
                self = .defaultImage
            } else {
                return nil
            }
        }
    }

    /// The error for a recorded read-only disk that is neither a layer nor the default image.
    static func unknownDisk(_ recorded: String) -> SwiftletError {
        SwiftletError(.invalidArgument, "the snapshot names the disk \(recorded), which is neither an image layer in the image store nor Swiftlet's default image: a snapshot may come from elsewhere, so it cannot make Swiftlet open other host files (a root filesystem given with --rootfs cannot be restored from a snapshot)")
    }

    /// This host's file for the read-only disk a snapshot recorded at `recorded`: the layer disk
    /// of the same digest in the image store at `storeRoot`, or the default image; else an error.
    static func layerDisk(_ recorded: String, storeRoot: String = ImageStore.defaultRoot()) throws(SwiftletError) -> String {
        switch RecordedDisk(recorded) {
        case .layer(let diffID):
            let store = try ImageStore(root: storeRoot)
            guard store.hasDisk(diffID: diffID) else {
                throw SwiftletError(.notFound, "the image layer \(diffID) that the snapshot was taken with is not in the image store (pull the image it belongs to, and try again)")
            }
            return store.diskPath(diffID: diffID)
        case .defaultImage:
            return GuestAssets.defaultImage
        case nil:
            throw unknownDisk(recorded)
        }
    }

    /// This host's kernel for the one a snapshot's machine record names: none (the default
    /// kernel) or the default kernel's path; any other path is refused.
    static func kernel(_ recorded: String?) throws(SwiftletError) -> String? {
        guard let recorded else { return nil }
        if recorded == GuestAssets.defaultKernel() || recorded == GuestAssets.defaultKernel(bzImage: true) { return recorded }
        throw SwiftletError(.invalidArgument, "the machine in the snapshot was made with the kernel \(recorded): a snapshot may come from elsewhere, so it cannot make Swiftlet boot a host file it names (only machines with the default kernel can be restored from a snapshot)")
    }

    /// The record a snapshot carries, with its layers and kernel resolved on this host (or refused).
    static func checked(_ record: MachineRecord) throws(SwiftletError) -> MachineRecord {
        var checked = record
        checked.layers = try record.layers.map { path throws(SwiftletError) in try layerDisk(path) }
        checked.kernel = try kernel(record.kernel)
        // Host directories are the user's choice on this host, never a file's: a record from a
        // snapshot, pack or another host shares none (its volumes are dropped).
        checked.volumes = nil
        return checked
    }
}
