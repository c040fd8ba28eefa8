import Glibc
import SwiftletSystem

/// A file server's tables as plain values, for snapshots: each file the guest holds (a node) and
/// each file it has open (a handle) by its names beneath its volume's directory, never by a host
/// path or a descriptor. A restore looks the names up again beneath the directories it is given.
public struct FileServerState: Codable, Sendable, Equatable {
    public struct SavedNode: Codable, Sendable, Equatable {
        public var id: UInt64
        public var volume: Int
        /// From the volume's directory down (none: the volume's directory itself).
        public var names: [[UInt8]]
        public var lookups: UInt64
    }

    public struct SavedHandle: Codable, Sendable, Equatable {
        public var id: UInt64
        public var node: UInt64
        /// nil: the server's own root directory (the list of volumes).
        public var volume: Int?
        public var names: [[UInt8]]
        public var directory: Bool
        public var flags: Int32
    }

    public var initialized: Bool
    public var nextNode: UInt64
    public var nextHandle: UInt64
    public var nodes: [SavedNode]
    public var handles: [SavedHandle]
}

extension FuseServer {
    /// What a restore could not take back: files removed from the host directories (or moved out
    /// of them) since the save, or no longer openable as they were. The guest gets ESTALE for
    /// such a node and EBADF for such a handle.
    public struct RestoreLosses: Sendable, Equatable {
        public var nodes = 0
        public var handles = 0
    }

    /// The tables as they are now. Files the host removed, or moved out of their volume, are left
    /// out (a restore treats them as gone). Nothing may be serving requests meanwhile.
    public func saveState() -> FileServerState {
        let s = state.withLock { $0 }
        let roots = volumes.map { ConfinedFiles.currentPath($0.root.rawValue) }
        func names(_ file: SharedDescriptor, volume: Int) -> [[UInt8]]? {
            guard let root = roots[volume], let path = ConfinedFiles.currentPath(file.rawValue) else { return nil }
            return Self.names(of: path, beneath: root)
        }
        var nodes: [FileServerState.SavedNode] = []
        for (id, node) in s.nodes.sorted(by: { $0.key < $1.key }) {
            guard let volume = node.volume, let file = node.file, let names = names(file, volume: volume) else { continue }
            nodes.append(.init(id: id, volume: volume, names: names, lookups: node.lookups))
        }
        var handles: [FileServerState.SavedHandle] = []
        for (id, handle) in s.handles.sorted(by: { $0.key < $1.key }) {
            var saved = FileServerState.SavedHandle(id: id, node: handle.node, volume: handle.volume, names: [],
                                                    directory: handle.directory, flags: handle.flags)
            if let volume = handle.volume {
                guard let names = names(handle.file, volume: volume) else { continue }
                saved.names = names
            }
            handles.append(saved)
        }
        return FileServerState(initialized: s.initialized, nextNode: s.nextNode, nextHandle: s.nextHandle, nodes: nodes, handles: handles)
    }

    /// `path`'s names below `root` (both as the kernel names them), or nil when it is not beneath it.
    static func names(of path: [UInt8], beneath root: [UInt8]) -> [[UInt8]]? {
        if path == root { return [] }
        let prefix = root == [0x2F] ? root : root + [0x2F]
        guard path.count > prefix.count, path.starts(with: prefix) else { return nil }
        return path[prefix.count...].split(separator: 0x2F, omittingEmptySubsequences: false).map { Array($0) }
    }

    /// Takes back saved tables (a snapshot's: untrusted) in place of the server's: each file is
    /// looked up by its names beneath its volume's directory (confined as every lookup is), each
    /// handle opened again with its flags (never truncating). Files that are gone are counted,
    /// not fatal; a state that does not fit this server (volumes it lacks, ids out of range or
    /// repeated, more than the limits, bad names) is refused.
    public func restore(_ saved: FileServerState) throws(SwiftletError) -> RestoreLosses {
        try check(saved)
        var restored = State()
        restored.initialized = saved.initialized
        restored.nextNode = saved.nextNode
        restored.nextHandle = saved.nextHandle
        var losses = RestoreLosses()
        for node in saved.nodes {
            guard case .success(let file) = ConfinedFiles.lookup(volumes[node.volume].root.rawValue, path: node.names),
                  case .success(let st) = ConfinedFiles.status(file.rawValue) else {
                losses.nodes += 1
                continue
            }
            let key = FileKey(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
            restored.nodes[node.id] = Node(file: file, volume: node.volume, key: key, lookups: node.lookups)
            if restored.byKey[key] == nil { restored.byKey[key] = node.id }
        }
        for handle in saved.handles {
            guard let volume = handle.volume else {
                restored.handles[handle.id] = Handle(file: SharedDescriptor(taking: -1), node: handle.node, volume: nil, directory: true, flags: O_RDONLY)
                continue
            }
            let flags = handle.directory ? O_RDONLY | O_DIRECTORY : Self.hostOpenFlags(handle.flags) & ~O_TRUNC
            guard !(volumes[volume].readOnly && flags & O_ACCMODE != O_RDONLY),
                  case .success(let held) = ConfinedFiles.lookup(volumes[volume].root.rawValue, path: handle.names),
                  case .success(let file) = ConfinedFiles.reopen(held.rawValue, flags: flags),
                  case .success(let st) = ConfinedFiles.status(file.rawValue), (st.st_mode & S_IFMT == S_IFDIR) == handle.directory else {
                losses.handles += 1
                continue
            }
            restored.handles[handle.id] = Handle(file: file, node: handle.node, volume: volume, directory: handle.directory, flags: flags)
        }
        replaceTables(with: restored)
        return losses
    }

    private func check(_ saved: FileServerState) throws(SwiftletError) {
        func refuse(_ what: String) -> SwiftletError { SwiftletError(.invalidFormat, "the saved virtio-fs state \(what)") }
        guard saved.nodes.count <= limits.nodes, saved.handles.count <= limits.handles else {
            throw refuse("holds \(saved.nodes.count) files and \(saved.handles.count) open files, more than the limits (\(limits.nodes), \(limits.handles))")
        }
        guard saved.nextNode >= 2, saved.nextHandle >= 1 else { throw refuse("has node or handle numbers out of range") }
        var nodeIDs = Set<UInt64>(), handleIDs = Set<UInt64>()
        func checkNames(_ names: [[UInt8]]) throws(SwiftletError) {
            guard names.count <= 2048 else { throw refuse("names a file \(names.count) directories deep") }
            for name in names {
                guard case .success = ConfinedFiles.checkName(name) else { throw refuse("names a file by an invalid name") }
            }
        }
        for node in saved.nodes {
            guard node.id >= 2, node.id < saved.nextNode, nodeIDs.insert(node.id).inserted, node.lookups >= 1 else {
                throw refuse("holds node \(node.id) out of range, repeated or not looked up")
            }
            guard volumes.indices.contains(node.volume) else {
                throw refuse("holds a file of volume \(node.volume), but the machine shares \(volumes.count) directories")
            }
            try checkNames(node.names)
        }
        for handle in saved.handles {
            guard handle.id >= 1, handle.id < saved.nextHandle, handleIDs.insert(handle.id).inserted, handle.node >= 1, handle.node < saved.nextNode else {
                throw refuse("holds handle \(handle.id) out of range or repeated")
            }
            if let volume = handle.volume {
                guard volumes.indices.contains(volume) else {
                    throw refuse("holds an open file of volume \(volume), but the machine shares \(volumes.count) directories")
                }
                try checkNames(handle.names)
            } else {
                guard handle.node == Fuse.rootNode, handle.directory, handle.names.isEmpty else { throw refuse("holds a bad handle of its root") }
            }
        }
    }
}
