import Glibc
import SwiftletSystem

extension EROFSBuilder {
    static let layoutPlain: UInt16 = 0
    static let layoutInline: UInt16 = 2
    static let direntSize = 12

    private struct Placed {
        let node: Node
        let parent: Node
        var xattrBody: [UInt8] = []
        var data: [UInt8]? // directory bytes (nids filled in later) or inline bytes
        var inline = false
    }

    /// Writes the image to `fd` (from offset 0); returns its size in bytes.
    @discardableResult
    public func write(to fd: Int32) throws(SwiftletError) -> UInt64 {
        let block = UInt64(Self.blockSize)
        // 1. Inode order: breadth first from the root (nid 0), each node once (hard links share).
        var placed: [Placed] = []
        var index: [ObjectIdentifier: Int] = [:]
        var queue = [(root, root)]
        root.laidOut = true
        var head = 0
        while head < queue.count {
            let (node, parent) = queue[head]
            head += 1
            index[ObjectIdentifier(node)] = placed.count
            placed.append(Placed(node: node, parent: parent))
            for name in node.children.keys.sorted(by: Self.byteOrder) {
                let child = node.children[name]!
                if !child.laidOut { child.laidOut = true; queue.append((child, node)) }
            }
        }
        // 2. Sizes: extended attributes, directory contents, what goes inline.
        for i in placed.indices {
            let node = placed[i].node
            placed[i].xattrBody = try Self.xattrBody(node.xattrs, warn: { warnings.append($0) })
            if node.kind == .directory {
                let size = Self.directorySize(Self.entries(of: node, parent: placed[i].parent))
                node.size = UInt64(size)
            }
            let dataSize = Int(node.size)
            let fits = Self.inodeSize + placed[i].xattrBody.count + dataSize <= Self.blockSize
            switch node.kind {
            case .file: placed[i].inline = node.inlineData != nil && dataSize > 0 && fits
            case .symlink: placed[i].inline = fits
            case .directory: placed[i].inline = dataSize <= Self.inlineLimit && fits
            default: placed[i].inline = false
            }
            if node.kind == .file || node.kind == .symlink, node.inlineData != nil, !placed[i].inline, dataSize > 0 {
                // Small data that cannot sit beside its inode (large xattrs): give it a block.
                try moveToSpool(node)
            }
        }
        // 3. Metadata offsets (block 1 on): 32-byte slots; an inode and its inline data never
        //    cross a block boundary.
        var position = 0
        for p in placed {
            var record = Self.inodeSize + p.xattrBody.count + (p.inline ? Int(p.node.size) : 0)
            record = (record + 31) & ~31
            guard record <= Self.blockSize else {
                throw SwiftletError(.unsupported, "an inode's extended attributes do not fit in one \(Self.blockSize)-byte block")
            }
            if position % Self.blockSize + record > Self.blockSize { position = (position / Self.blockSize + 1) * Self.blockSize }
            p.node.nid = UInt64(position / 32)
            position += record
        }
        let metaBlocks = UInt64((position + Self.blockSize - 1) / Self.blockSize)
        let dataStart = 1 + metaBlocks
        let spoolBlocks = spoolBlockCount
        var nextExtra = dataStart + spoolBlocks
        var extra: [[UInt8]] = []
        for i in placed.indices {
            let node = placed[i].node
            if let b = node.spoolBlock { node.plainBlock = dataStart + b }
            if node.kind == .directory {
                placed[i].data = Self.directoryBytes(Self.entries(of: node, parent: placed[i].parent))
                if !placed[i].inline {
                    node.plainBlock = nextExtra
                    var bytes = placed[i].data!
                    bytes += [UInt8](repeating: 0, count: (Self.blockSize - bytes.count % Self.blockSize) % Self.blockSize)
                    nextExtra += UInt64(bytes.count / Self.blockSize)
                    extra.append(bytes)
                }
            } else if placed[i].inline {
                placed[i].data = node.inlineData
            }
        }
        for (ino, p) in placed.enumerated() { p.node.ino = UInt32(ino + 1) }
        let totalBlocks = nextExtra
        guard totalBlocks <= UInt64(UInt32.max) else { throw SwiftletError(.unsupported, "the image would exceed 16 TiB") }
        try limits.requireSpace(totalBlocks * block, fd: fd, what: "an EROFS image of \(totalBlocks * block) bytes")

        // 4. Emit: superblock, metadata, spooled file data, directory blocks.
        var meta = [UInt8](repeating: 0, count: Int(metaBlocks) * Self.blockSize)
        for p in placed {
            let at = Int(p.node.nid) * 32
            let inode = Self.inode(p.node, layout: p.inline ? Self.layoutInline : Self.layoutPlain, xattrBytes: p.xattrBody.count,
                                   links: p.node.kind == .directory ? 2 + p.node.children.values.filter { $0.kind == .directory }.count : p.node.links)
            meta.replaceSubrange(at..<(at + Self.inodeSize), with: inode)
            meta.replaceSubrange((at + Self.inodeSize)..<(at + Self.inodeSize + p.xattrBody.count), with: p.xattrBody)
            if p.inline, let data = p.data {
                let start = at + Self.inodeSize + p.xattrBody.count
                meta.replaceSubrange(start..<(start + data.count), with: data)
            }
        }
        var first = [UInt8](repeating: 0, count: Self.blockSize)
        first.replaceSubrange(Self.superblockOffset..<(Self.superblockOffset + 128), with: superblock(inodes: UInt64(placed.count), blocks: UInt32(totalBlocks)))
        var offset: UInt64 = 0
        func emit(_ bytes: [UInt8]) throws(SwiftletError) {
            try bytes.withBytes { b throws(SwiftletError) in try OwnedFileDescriptor.write(fd: fd, from: b, at: offset, what: "the EROFS image") }
            offset += UInt64(bytes.count)
        }
        try emit(first)
        try emit(meta)
        try copySpool(to: fd, at: offset, blocks: spoolBlocks)
        offset += spoolBlocks * block
        for bytes in extra { try emit(bytes) }
        guard ftruncate(fd, off_t(offset)) == 0 else { throw SwiftletError.system("cannot size the EROFS image", errno: currentErrno) }
        return offset
    }

    static func byteOrder(_ a: String, _ b: String) -> Bool { a.utf8.lexicographicallyPrecedes(b.utf8) }

    /// A directory's entries in on-disk order: ".", "..", then the children, sorted bytewise.
    static func entries(of node: Node, parent: Node) -> [(name: [UInt8], node: Node)] {
        var list: [(name: [UInt8], node: Node)] = [(Array(".".utf8), node), (Array("..".utf8), parent)]
        list += node.children.map { (Array($0.key.utf8), $0.value) }
        return list.sorted { $0.name.lexicographicallyPrecedes($1.name) }
    }

    /// Entries packed into blocks: each block starts with its dirents, then their names.
    static func packBlocks(_ entries: [(name: [UInt8], node: Node)]) -> [[(name: [UInt8], node: Node)]] {
        var blocks: [[(name: [UInt8], node: Node)]] = [[]]
        var used = 0
        for entry in entries {
            let cost = direntSize + entry.name.count
            if used + cost > blockSize { blocks.append([]); used = 0 }
            blocks[blocks.count - 1].append(entry)
            used += cost
        }
        return blocks
    }

    static func directorySize(_ entries: [(name: [UInt8], node: Node)]) -> Int {
        let blocks = packBlocks(entries)
        let last = blocks.last!.reduce(0) { $0 + direntSize + $1.name.count }
        return (blocks.count - 1) * blockSize + last
    }

    static func directoryBytes(_ entries: [(name: [UInt8], node: Node)]) -> [UInt8] {
        var out: [UInt8] = []
        let blocks = packBlocks(entries)
        for (i, entries) in blocks.enumerated() {
            var names: [UInt8] = []
            var dirents: [UInt8] = []
            var nameOffset = entries.count * direntSize
            for entry in entries {
                dirents += LittleEndian.bytes(entry.node.nid, 8) + LittleEndian.bytes(UInt64(nameOffset), 2) + [entry.node.fileType, 0]
                names += entry.name
                nameOffset += entry.name.count
            }
            var blockBytes = dirents + names
            if i < blocks.count - 1 { blockBytes += [UInt8](repeating: 0, count: blockSize - blockBytes.count) }
            out += blockBytes
        }
        return out
    }

    /// The 64-byte extended inode.
    static func inode(_ node: Node, layout: UInt16, xattrBytes: Int, links: Int) -> [UInt8] {
        var b: [UInt8] = []
        let icount = xattrBytes == 0 ? 0 : (xattrBytes - 12) / 4 + 1
        b += LittleEndian.bytes(UInt64(1 | layout << 1), 2)                   // i_format: extended, data layout
        b += LittleEndian.bytes(UInt64(icount), 2)                           // i_xattr_icount
        b += LittleEndian.bytes(UInt64(node.typeBits | (node.mode & 0o7777)), 2)
        b += LittleEndian.bytes(0, 2)
        b += LittleEndian.bytes(node.size, 8)
        let u: UInt64
        switch node.kind {
        case .characterDevice, .blockDevice: u = UInt64(node.rdev)
        default: u = layout == layoutPlain && node.size > 0 ? node.plainBlock : 0
        }
        b += LittleEndian.bytes(u, 4)                                         // raw_blkaddr or rdev
        b += LittleEndian.bytes(UInt64(node.ino), 4)
        b += LittleEndian.bytes(UInt64(node.uid), 4) + LittleEndian.bytes(UInt64(node.gid), 4)
        b += LittleEndian.bytes(UInt64(bitPattern: max(0, node.mtime)), 8) + LittleEndian.bytes(0, 4)
        b += LittleEndian.bytes(UInt64(links), 4)
        b += [UInt8](repeating: 0, count: 16)
        return b
    }

    /// The in-inode extended attribute body: a 12-byte header, then entries padded to 4 bytes.
    static func xattrBody(_ xattrs: [(String, [UInt8])], warn: (String) -> Void) throws(SwiftletError) -> [UInt8] {
        guard !xattrs.isEmpty else { return [] }
        let prefixes: [(String, UInt8)] = [("user.", 1), ("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
                                           ("trusted.", 4), ("security.", 6)]
        var body = [UInt8](repeating: 0, count: 12)
        for (name, value) in xattrs {
            guard let (prefix, index) = prefixes.first(where: { name.hasPrefix($0.0) }) else {
                warn("extended attribute \(name) has a namespace EROFS cannot store; dropped")
                continue
            }
            let suffix = Array(name.utf8.dropFirst(prefix.utf8.count))
            guard suffix.count <= 255, value.count <= 65535 else { throw SwiftletError(.unsupported, "extended attribute \(name) is too large") }
            var entry = [UInt8(suffix.count), index] + LittleEndian.bytes(UInt64(value.count), 2) + suffix + value
            entry += [UInt8](repeating: 0, count: (4 - entry.count % 4) % 4)
            body += entry
        }
        return body.count == 12 ? [] : body
    }

    func superblock(inodes: UInt64, blocks: UInt32) -> [UInt8] {
        var b: [UInt8] = []
        b += LittleEndian.bytes(UInt64(Self.magic), 4) + LittleEndian.bytes(0, 4) + LittleEndian.bytes(0, 4)   // magic, checksum, feature_compat
        b += [12, 0] + LittleEndian.bytes(root.nid, 2)                       // blkszbits, sb_extslots, root_nid
        b += LittleEndian.bytes(inodes, 8) + LittleEndian.bytes(0, 8) + LittleEndian.bytes(0, 4)             // inos, build_time, build_time_nsec
        b += LittleEndian.bytes(UInt64(blocks), 4) + LittleEndian.bytes(1, 4) + LittleEndian.bytes(0, 4)     // blocks, meta_blkaddr, xattr_blkaddr
        b += [UInt8](repeating: 0, count: 16)                // uuid
        b += Array("swiftlet".utf8) + [UInt8](repeating: 0, count: 8) // volume name
        b += LittleEndian.bytes(0, 4)                                         // feature_incompat
        b += [UInt8](repeating: 0, count: 128 - b.count)
        return b
    }
}

