import Glibc
import SwiftletSystem

/// Builds an uncompressed EROFS image (the on-disk format of Linux's fs/erofs) from tar entries,
/// without root and without mounting anything: ownership, modes, device numbers, symlinks, hard
/// links and extended attributes come from the archive, not from a host filesystem.
///
/// Layout: block 0 holds the superblock (at byte 1024); the metadata area (from block 1) holds
/// every inode (64-byte extended form) with its extended attributes and, for files, directories
/// and symlinks of up to `inlineLimit` bytes, its data right after it; larger data follows in
/// whole blocks. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) become overlayfs whiteouts (0/0
/// character devices) and opaque directories (`trusted.overlay.opaque=y`), so layers stack with
/// overlayfs in the guest.
///
/// Several layers can be merged into one image (`beginLayer()` before each after the first): a
/// later layer's entries replace earlier ones, its whiteouts hide them (and stay whiteouts, for
/// the disks below), and its opaque directories drop what earlier layers put in them.
///
/// Entries are untrusted: `limits` bounds the entry count, the metadata kept in memory, path depth
/// and name lengths, and file data is written only while the file system keeps its reserve free;
/// an entry the image could not represent faithfully (a name over 255 bytes, attributes that do not
/// fit beside their inode, a whiteout of nothing) is refused, so an image that is built passes
/// `fsck.erofs`.
public final class EROFSBuilder {
    public static let blockSize = 4096
    static let inodeSize = 64
    static let inlineLimit = 2048
    static let superblockOffset = 1024
    static let magic: UInt32 = 0xE0F5_E1E2

    final class Node {
        enum Kind { case file, directory, symlink, characterDevice, blockDevice, fifo, socket }
        var kind: Kind
        var mode: UInt32
        var uid: UInt32 = 0, gid: UInt32 = 0
        var mtime: Int64 = 0
        var rdev: UInt32 = 0
        var size: UInt64 = 0
        var xattrs: [(String, [UInt8])] = []
        var children: [String: Node] = [:]
        /// Small data kept for the metadata area, or the block (in the spool) where large data starts.
        var inlineData: [UInt8]?
        var spoolBlock: UInt64?
        var links = 1
        /// The layer (counted from 0 in this image) that made the node.
        var layer = 0
        // Assigned at layout time.
        var nid: UInt64 = 0
        var ino: UInt32 = 0
        var plainBlock: UInt64 = 0
        var laidOut = false

        init(kind: Kind, mode: UInt32) { self.kind = kind; self.mode = mode }

        /// An overlayfs whiteout: a 0/0 character device.
        var isWhiteout: Bool { kind == .characterDevice && rdev == 0 }

        var typeBits: UInt32 {
            switch kind {
            case .file: return UInt32(S_IFREG)
            case .directory: return UInt32(S_IFDIR)
            case .symlink: return UInt32(S_IFLNK)
            case .characterDevice: return UInt32(S_IFCHR)
            case .blockDevice: return UInt32(S_IFBLK)
            case .fifo: return UInt32(S_IFIFO)
            case .socket: return UInt32(S_IFSOCK)
            }
        }
        var fileType: UInt8 {
            switch kind {
            case .file: return 1
            case .directory: return 2
            case .characterDevice: return 3
            case .blockDevice: return 4
            case .fifo: return 5
            case .socket: return 6
            case .symlink: return 7
            }
        }
    }

    let root = Node(kind: .directory, mode: 0o755)
    private let spool: OwnedFileDescriptor
    private var spoolBlocks: UInt64 = 0
    public internal(set) var warnings: [String] = []
    /// The layer entries are being added for.
    private var currentLayer = 0
    let limits: ImportLimits
    /// Entries made so far and the metadata bytes they keep in memory (see `ImportLimits`).
    private var entries = 0
    private var metadataBytes: UInt64 = 0
    /// What `ImportLimits.maxMetadataBytes` charges each entry besides its names and data.
    static let entryCost: UInt64 = 256

    /// Starts the next layer: what it adds goes over everything added so far.
    public func beginLayer() { currentLayer += 1 }

    /// Puts `node` at `name` in `parent`, giving up the name's previous node (a hard link's count drops).
    private func place(_ node: Node?, at name: String, in parent: Node) {
        if let old = parent.children[name], old !== node, old.kind != .directory, old.links > 1 { old.links -= 1 }
        parent.children[name] = node
    }

    /// `scratchDirectory` holds an unlinked spool file for file data while the tree is built.
    public init(scratchDirectory: String, limits: ImportLimits = ImportLimits()) throws(SwiftletError) {
        self.limits = limits
        spool = try OwnedFileDescriptor.unlinkedTemporaryFile(in: scratchDirectory, prefix: "erofs-spool")
    }

    /// Counts one more entry of `bytes` in-memory metadata against the limits.
    private func charge(_ bytes: Int, for path: String) throws(SwiftletError) {
        entries += 1
        guard entries <= limits.maxEntries else {
            throw SwiftletError(.invalidFormat, "the layer has more than \(limits.maxEntries) entries (at \(path))")
        }
        metadataBytes += Self.entryCost + UInt64(bytes)
        guard metadataBytes <= limits.maxMetadataBytes else {
            throw SwiftletError(.invalidFormat, "the layer's metadata (names, small files, attributes) exceeds \(limits.maxMetadataBytes >> 20) MiB (at \(path))")
        }
    }

    // MARK: building the tree

    /// Splits an archive path into safe components: no absolute paths, no `..`, no NUL, each
    /// component at most `maxNameBytes` bytes and at most `maxDepth` of them.
    static func components(_ path: String, limits: ImportLimits = ImportLimits()) throws(SwiftletError) -> [String] {
        let parts = path.split(separator: "/").map(String.init).filter { $0 != "." && !$0.isEmpty }
        guard !parts.contains("..") else { throw SwiftletError(.invalidFormat, "layer entry \(path) escapes the root with '..'") }
        guard parts.count <= limits.maxDepth else {
            throw SwiftletError(.invalidFormat, "layer entry \(path.prefix(200))... is more than \(limits.maxDepth) directories deep")
        }
        for part in parts {
            guard part.utf8.count <= limits.maxNameBytes else {
                throw SwiftletError(.invalidFormat, "layer entry \(path.prefix(200)) has a name of \(part.utf8.count) bytes; names are at most \(limits.maxNameBytes)")
            }
            guard !part.utf8.contains(0) else { throw SwiftletError(.invalidFormat, "layer entry \(path) has a NUL byte in its name") }
        }
        return parts
    }

    private func directory(_ parts: ArraySlice<String>) throws(SwiftletError) -> Node {
        var node = root
        for part in parts {
            if let child = node.children[part], child.kind == .directory {
                child.layer = max(child.layer, currentLayer) // this layer has it too, implicitly
                node = child
            } else if let child = node.children[part], !(child.isWhiteout && child.layer < currentLayer) {
                throw SwiftletError(.invalidFormat, "layer path component \(part) is not a directory")
            } else if node.children[part] != nil {
                // An earlier merged layer deleted this directory; this layer makes it anew.
                try charge(part.utf8.count, for: part)
                let child = Node(kind: .directory, mode: 0o755)
                child.layer = currentLayer
                markOpaque(child)
                node.children[part] = child
                node = child
            } else {
                try charge(part.utf8.count, for: part)
                let child = Node(kind: .directory, mode: 0o755)
                child.layer = currentLayer
                node.children[part] = child
                node = child
            }
        }
        return node
    }

    private func lookup(_ path: String) throws(SwiftletError) -> Node? {
        var node = root
        for part in try Self.components(path, limits: limits) {
            guard let child = node.children[part] else { return nil }
            node = child
        }
        return node
    }

    /// Adds one entry; `readData` fills a buffer with the entry's data and returns how much it read.
    public func add(_ entry: TarEntry, readData: (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int) throws(SwiftletError) {
        let parts = try Self.components(entry.path, limits: limits)
        guard let name = parts.last else {
            // The root itself: take its attributes.
            root.mode = entry.mode; root.uid = entry.uid; root.gid = entry.gid; root.mtime = entry.mtime
            return
        }
        let parent = try directory(parts.dropLast())
        if name == ".wh..wh..opq" {
            // Hides what lower layers have here: earlier merged layers' entries go, disks below are hidden.
            purgeLowerLayers(parent)
            markOpaque(parent)
            return
        }
        if name.hasPrefix(".wh.") {
            let hidden = String(name.dropFirst(4))
            guard !hidden.isEmpty, hidden != ".", hidden != ".." else {
                throw SwiftletError(.invalidFormat, "layer entry \(entry.path) is a whiteout of '\(hidden)', which names nothing")
            }
            try charge(name.utf8.count, for: entry.path)
            let whiteout = Node(kind: .characterDevice, mode: 0)
            whiteout.mtime = entry.mtime
            whiteout.layer = currentLayer
            place(whiteout, at: hidden, in: parent)
            return
        }
        // What the entry keeps in memory: its name, extended attributes, small data, link target.
        var kept = name.utf8.count + entry.xattrs.reduce(0) { $0 + $1.key.utf8.count + $1.value.count }
        switch entry.kind {
        case .file where entry.size <= UInt64(Self.inlineLimit): kept += Int(entry.size)
        case .symlink(let target), .hardLink(let target): kept += target.utf8.count
        default: break
        }
        try charge(kept, for: entry.path)
        let xattrs = entry.xattrs.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        if !xattrs.isEmpty {
            // Attributes sit beside their inode, in its block: refuse what could never be laid out.
            let body = try Self.xattrBody(xattrs + [("trusted.overlay.opaque", Array("y".utf8))], warn: { _ in })
            guard Self.inodeSize + body.count <= Self.blockSize else {
                throw SwiftletError(.invalidFormat, "layer entry \(entry.path) has \(body.count) bytes of extended attributes; at most \(Self.blockSize - Self.inodeSize) fit")
            }
        }
        let node: Node
        switch entry.kind {
        case .directory:
            if let existing = parent.children[name], existing.kind == .directory {
                node = existing // a directory listed again keeps its contents
            } else {
                node = Node(kind: .directory, mode: entry.mode)
                // A directory made where an earlier merged layer left a whiteout must hide the disks below.
                if let existing = parent.children[name], existing.isWhiteout { markOpaque(node) }
            }
        case .file:
            node = Node(kind: .file, mode: entry.mode)
            node.size = entry.size
            try storeData(node, size: entry.size, readData: readData)
        case .symlink(let target):
            node = Node(kind: .symlink, mode: 0o777)
            node.inlineData = Array(target.utf8)
            node.size = UInt64(target.utf8.count)
            if node.size == 0 {
                throw SwiftletError(.invalidFormat, "symlink \(entry.path) has an empty target, which Linux does not allow")
            }
            if node.size > UInt64(Self.inlineLimit) {
                throw SwiftletError(.invalidFormat, "symlink \(entry.path) has a target of \(node.size) bytes")
            }
        case .hardLink(let target):
            guard let existing = try lookup(target), existing.kind != .directory else {
                throw SwiftletError(.invalidFormat, "hard link \(entry.path) points at \(target), which is not an earlier file in the layer")
            }
            existing.links += 1
            place(existing, at: name, in: parent)
            return
        case .characterDevice(let major, let minor):
            node = Node(kind: .characterDevice, mode: entry.mode); node.rdev = Self.encodeDevice(major, minor)
        case .blockDevice(let major, let minor):
            node = Node(kind: .blockDevice, mode: entry.mode); node.rdev = Self.encodeDevice(major, minor)
        case .fifo:
            node = Node(kind: .fifo, mode: entry.mode)
        }
        let opaque = node.xattrs.contains { $0.0 == "trusted.overlay.opaque" }
        node.mode = entry.mode
        node.uid = entry.uid; node.gid = entry.gid; node.mtime = entry.mtime
        node.xattrs = xattrs
        if opaque { markOpaque(node) }
        node.layer = max(node.layer, currentLayer)
        place(node, at: name, in: parent)
    }

    /// Drops what earlier merged layers put under `directory` (what this layer put there stays).
    private func purgeLowerLayers(_ directory: Node) {
        for (name, child) in directory.children {
            if child.layer < currentLayer { place(nil, at: name, in: directory) }
            else if child.kind == .directory { purgeLowerLayers(child) }
        }
    }

    private func markOpaque(_ directory: Node) {
        directory.xattrs.removeAll { $0.0 == "trusted.overlay.opaque" }
        directory.xattrs.append(("trusted.overlay.opaque", Array("y".utf8)))
    }

    /// Linux's new_encode_dev.
    static func encodeDevice(_ major: UInt32, _ minor: UInt32) -> UInt32 {
        (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    }

    /// Reads `size` bytes of `node`'s data: small data stays in memory (unless `spooled`), the rest
    /// goes to the spool in whole blocks.
    func storeData(_ node: Node, size: UInt64, spooled: Bool = false,
                   readData: (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Int) throws(SwiftletError) {
        guard size <= limits.maxLayerBytes else {
            throw SwiftletError(.invalidFormat, "a layer file of \(size) bytes is larger than a layer may be (\(limits.maxLayerBytes) bytes)")
        }
        if size <= UInt64(Self.inlineLimit) && !spooled {
            var bytes = [UInt8](repeating: 0, count: Int(size))
            var done = 0
            while done < bytes.count {
                let n = try bytes.withMutableBytes { b throws(SwiftletError) in try readData(UnsafeMutableRawBufferPointer(rebasing: b[done...])) }
                guard n > 0 else { throw SwiftletError(.invalidFormat, "layer file data ends early") }
                done += n
            }
            node.inlineData = bytes
            return
        }
        try limits.requireSpace(size, fd: spool.rawValue, what: "a layer file of \(size) bytes")
        node.spoolBlock = spoolBlocks
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var left = size
        var offset = spoolBlocks * UInt64(Self.blockSize)
        while left > 0 {
            let want = Int(min(left, UInt64(buffer.count)))
            var got = 0
            while got < want {
                let n = try buffer.withMutableBytes { b throws(SwiftletError) in try readData(UnsafeMutableRawBufferPointer(rebasing: b[got..<want])) }
                guard n > 0 else { throw SwiftletError(.invalidFormat, "layer file data ends early") }
                got += n
            }
            try buffer.withBytes { b throws(SwiftletError) in try spool.write(from: UnsafeRawBufferPointer(rebasing: b[0..<want]), at: offset, what: "the EROFS spool") }
            offset += UInt64(want)
            left -= UInt64(want)
        }
        spoolBlocks += (size + UInt64(Self.blockSize) - 1) / UInt64(Self.blockSize)
    }

    var spoolBlockCount: UInt64 { spoolBlocks }

    /// Moves a node's in-memory data into the spool (whole blocks).
    func moveToSpool(_ node: Node) throws(SwiftletError) {
        guard let data = node.inlineData else { return }
        node.inlineData = nil
        var at = 0
        try storeData(node, size: UInt64(data.count), spooled: true) { buffer throws(SwiftletError) in
            let n = min(buffer.count, data.count - at)
            buffer.copyBytes(from: data[at..<at + n])
            at += n
            return n
        }
    }

    /// Copies the spooled file data into the image at `offset`.
    func copySpool(to fd: Int32, at offset: UInt64, blocks: UInt64) throws(SwiftletError) {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        let total = blocks * UInt64(Self.blockSize)
        while done < total {
            let want = Int(min(UInt64(buffer.count), total - done))
            // Blocks past the spool's end (the padding of its last file) read as zeros.
            for i in 0..<want { buffer[i] = 0 }
            let n = buffer.withUnsafeMutableBytes { pread(spool.rawValue, $0.baseAddress, want, off_t(done)) }
            guard n >= 0 else { throw SwiftletError.system("cannot read the EROFS spool", errno: currentErrno) }
            try buffer.withBytes { b throws(SwiftletError) in
                try OwnedFileDescriptor.write(fd: fd, from: UnsafeRawBufferPointer(rebasing: b[0..<want]), at: offset + done, what: "the EROFS image")
            }
            done += UInt64(want)
        }
    }
}
