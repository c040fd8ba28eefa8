import FoundationEssentials
import Hypervisor
import Glibc
import Images
import MachineState
import Pack
import Synchronization
import SwiftletSystem
import VMM

/// A machine in one file (docs/pack-format.md), of three kinds: `create(fromSnapshot:)` packs a
/// full snapshot (state, memory, writable disks, recorded working set) with the read-only disks
/// it was taken with (image layers, or the default image), so that it restores on a host that
/// has none of them; `create(machine:)` a machine (stopped: its description and disks; running,
/// with `withMemory`: a snapshot of it); `create(image:)` an image with the kernel and agent it
/// boots with. `unpack` makes a private directory of a pack for a run or a machine.
///
/// Part names: `state`, `memory`, `working-set`, `disk-N` (a snapshot directory's files);
/// `machine`, `disk` (a machine's description and disk); `image`, `kernel`, `agent`;
/// `layer-sha256-HEX` (an image layer's disk, by its diff ID) and `default-image`.
public enum MachinePack {
    static let stateFiles = [SnapshotDirectory.stateFileName, SnapshotDirectory.memoryFileName]
    static let defaultImagePart = "default-image"
    static let layerPrefix = "layer-sha256-"

    /// What packing wrote.
    public struct Report: Sendable {
        public var manifest: PackManifest
        public var path: String
        /// The pack file's size.
        public var bytes: UInt64
    }

    /// Packs the full snapshot in `directory` into a new file at `output` (written beside it
    /// and renamed into place: a failure leaves nothing there). Its read-only disks are found as
    /// a restore finds them (image layers in this user's store by digest, the default image);
    /// one that cannot be found is an error naming it.
    ///
    /// With `executable` (a program's file, Swiftlet's own static executable), the output is that
    /// program with the pack appended, executable (mode 0755): started, it runs the packed
    /// machine (`PackedProgram`).
    ///
    /// The manifest carries the CPU contract of the snapshot's memory (`CPUContract`). With
    /// `cpuTemplate`, the snapshot's guest must have been shown no more than that template's
    /// features (its machine made with it), or the pack is refused: a running guest's CPU cannot
    /// be cut down after it has looked.
    public static func create(fromSnapshot directory: String, to output: String, executable: String? = nil,
                              cpuTemplate: CPUTemplate? = nil) throws(SwiftletError) -> Report {
        let snapshot = SnapshotDirectory(directory)
        let files = try Machine.files(ofSnapshot: snapshot.path)
        let contract = try Machine.cpuContract(ofSnapshot: snapshot.path)
        if let cpuTemplate {
            let beyond = contract.features(beyond: cpuTemplate)
            guard beyond.isEmpty else {
                throw SwiftletError(.invalidArgument, "the machine in the snapshot in \(directory) was shown CPU features the \(cpuTemplate.rawValue) template does not have (\(beyond.joined(separator: ", "))): make the machine with --cpu-template \(cpuTemplate.rawValue); a running guest's CPU cannot be changed")
            }
        }
        // Every part's source, found before anything is written.
        var sources: [(name: String, path: String)] = stateFiles.map { ($0, snapshot.path + "/" + $0) }
        if access(snapshot.workingSetPath, F_OK) == 0 { sources.append((SnapshotDirectory.workingSetFileName, snapshot.workingSetPath)) }
        for path in files.writable { sources.append((String(path.split(separator: "/").last!), path)) }
        _ = try addReadOnlyDisks(files.readOnly, to: &sources)
        return try write(kind: .snapshot, to: output, executable: executable, parts: sources, cpu: contract)
    }

    /// Adds the read-only disks at `recorded` (image layers in the store, the default image;
    /// anything else is an error naming it) to `sources` as parts, each once, found as a restore
    /// finds them; returns their part names in order.
    static func addReadOnlyDisks(_ recorded: [String], to sources: inout [(name: String, path: String)]) throws(SwiftletError) -> [String] {
        var names: [String] = []
        for path in recorded {
            guard let disk = SnapshotPaths.RecordedDisk(path) else { throw SnapshotPaths.unknownDisk(path) }
            let name = partName(disk)
            names.append(name)
            if !sources.contains(where: { $0.name == name }) { sources.append((name, try SnapshotPaths.layerDisk(path))) }
        }
        return names
    }

    /// Writes a pack of `kind` holding the files `parts` and the byte strings `bytes` to
    /// `output`, after `executable` when given (written beside `output` and renamed into place).
    static func write(kind: PackManifest.Kind, to output: String, executable: String?, parts: [(name: String, path: String)],
                      bytes: [(name: String, bytes: [UInt8])] = [], cpu: CPUContract? = nil) throws(SwiftletError) -> Report {
        var result: Report?
        try OwnedFileDescriptor.writeIntoPlace(FileTree.absolute(output)) { file throws(SwiftletError) in
            var start: UInt64 = 0
            if let executable {
                // The pack starts on a page boundary, so its stored chunks are page-aligned in the
                // file too (a reader can map them); the gap is a hole.
                let programBytes = try writeProgram(executable, to: file)
                start = (programBytes + PackWriter.alignment - 1) / PackWriter.alignment * PackWriter.alignment
                try file.setMode(0o755, what: output)
            }
            let writer = try PackWriter(fd: file.rawValue, start: start)
            for (name, contents) in bytes { try writer.add(name: name, bytes: contents) }
            for source in parts {
                let input = try OwnedFileDescriptor.openRegularFile(source.path, flags: O_RDONLY | O_CLOEXEC, what: "the file of part \(source.name)")
                try writer.add(name: source.name, contentsOf: input, size: try input.size(), what: source.path)
            }
            let (manifest, length) = try writer.finish(kind: kind, createdBy: "swiftlet", cpu: cpu)
            try systemCall("cannot write \(output) to disk") { fsync(file.rawValue) }
            result = Report(manifest: manifest, path: FileTree.absolute(output), bytes: length)
        }
        return result!
    }

    /// Writes the program a packed executable starts with to the start of `destination`:
    /// `path`'s file, up to a pack it already carries (Swiftlet started as a packed program packs
    /// with itself, not its machine). Returns the bytes written, where the pack is to start.
    static func writeProgram(_ path: String, to destination: borrowing OwnedFileDescriptor) throws(SwiftletError) -> UInt64 {
        let source = try OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY | O_CLOEXEC, what: "the program")
        let bytes = looksLikePack(path) ? try PackReader(path: path).start : try source.size()
        let fd = destination.rawValue
        try source.forEachPiece(upTo: bytes, what: "the program") { piece, offset throws(SwiftletError) in
            try OwnedFileDescriptor.write(fd: fd, from: piece, at: offset, what: "the packed program")
        }
        return bytes
    }

    /// A machine's description in a machine pack (`machine` part): its record without host
    /// paths or network policy (a pack's is never applied), its read-only disks by part name.
    struct PackedMachine: Codable {
        var source: String
        var layers: [String]
        var defaults: ExecDefaults
        var cpus: Int
        var memoryMiB: Int
        var diskMiB: Int
        /// The CPU baseline it boots with (nil: the host's CPU).
        var cpuTemplate: CPUTemplate?
    }

    static let machinePart = "machine", machineDiskPart = "disk"

    /// Packs the machine `name` into a new file at `output`. With `withMemory` (the machine must
    /// run), a snapshot of it, which keeps running: a snapshot pack (`create(fromSnapshot:)`).
    /// Without (the machine must be stopped: its disk is read as it is), a machine pack: its
    /// description, disk and read-only disks, which boots where it is made a machine again.
    /// `cpuTemplate`: with memory, the machine must have been made with it (see
    /// `create(fromSnapshot:)`); without, the packed machine boots with it (else with the
    /// machine's own).
    public static func create(machine name: String, withMemory: Bool, to output: String, executable: String? = nil,
                              cpuTemplate: CPUTemplate? = nil) throws(SwiftletError) -> Report {
        let directory = try MachineDirectory(name: name)
        let record = try directory.record()
        if withMemory {
            let reservation = try UnpackArea.reserve(prefix: "snapshot-")
            let scratch = reservation.path
            defer { UnpackArea.release(scratch); _ = reservation.lock.rawValue } // the lock is held until here
            _ = try Machines.snapshot(name, to: scratch)
            return try create(fromSnapshot: scratch, to: output, executable: executable, cpuTemplate: cpuTemplate)
        }
        guard directory.state == .stopped else {
            throw SwiftletError(.invalidArgument, "machine \(name) is running: stop it to pack its disk, or pack it running with --with-memory")
        }
        guard record.diskBase == nil else {
            throw SwiftletError(.invalidArgument, "machine \(name) is a fork, whose disk is an overlay over its siblings': pack it running with --with-memory")
        }
        guard record.kernel == nil || (try? SnapshotPaths.kernel(record.kernel)) != nil else {
            throw SwiftletError(.invalidArgument, "machine \(name) boots the kernel \(record.kernel!), which a pack does not carry: only machines with the default kernel can be packed")
        }
        var sources: [(name: String, path: String)] = [(machineDiskPart, directory.diskPath)]
        let layers = try addReadOnlyDisks(record.layers, to: &sources)
        let description = PackedMachine(source: record.source, layers: layers, defaults: record.defaults, cpus: record.cpus,
                                        memoryMiB: record.memoryMiB, diskMiB: record.diskMiB, cpuTemplate: cpuTemplate ?? record.cpuTemplate)
        return try write(kind: .machine, to: output, executable: executable, parts: sources, bytes: [(machinePart, try encode(description))])
    }

    /// The record of a machine pack unpacked at `root` (its `machine` part, untrusted: every
    /// field checked, its layers the pack's own disks). `what` names the pack in errors.
    static func bootRecord(unpackedAt root: String, what: String) throws(SwiftletError) -> MachineRecord {
        let machine = try description(PackedMachine.self, in: root + "/" + machinePart, what: what, kind: "machine")
        let record = MachineRecord(name: "", source: machine.source, layers: try layerFiles(machine.layers, unpackedAt: root, what: what),
                                   defaults: machine.defaults, cpus: machine.cpus, memoryMiB: machine.memoryMiB, kernel: nil,
                                   diskMiB: machine.diskMiB, created: 0, cpuTemplate: machine.cpuTemplate)
        try checkShape(record, what: what)
        return record
    }

    /// Refuses a machine record from a pack (untrusted) that Swiftlet could not run: vCPUs,
    /// memory and disk size out of range, a source name longer than a name should be.
    static func checkShape(_ record: MachineRecord, what: String) throws(SwiftletError) {
        guard (1...MachineConfig.maximumCPUs).contains(record.cpus), record.memoryMiB >= MachineConfig.minimumMemoryMiB,
              record.memoryMiB <= 16 << 20, (64...(16 << 20)).contains(record.diskMiB), record.source.utf8.count <= 4096 else {
            throw SwiftletError(.invalidFormat, "\(what) describes a machine Swiftlet cannot make (\(record.cpus) vCPUs, \(record.memoryMiB) MiB, a \(record.diskMiB) MiB disk)")
        }
    }

    /// A pack's JSON description part, unpacked at `path` (`kind` names it in errors).
    static func description<T: Decodable>(_ type: T.Type, in path: String, what: String, kind: String) throws(SwiftletError) -> T {
        let bytes = try OwnedFileDescriptor.readSmallFile(path, limit: 1 << 20)
        do { return try JSONDecoder().decode(T.self, from: Data(bytes)) } catch {
            throw SwiftletError(.invalidFormat, "\(what) holds an unreadable \(kind) description: \(error)")
        }
    }

    /// The unpacked files of the layer parts a description names, bottom first: 1 to
    /// `ImageStore.maximumLayerDisks` plain part names the pack holds.
    static func layerFiles(_ parts: [String], unpackedAt root: String, what: String) throws(SwiftletError) -> [String] {
        guard (1...ImageStore.maximumLayerDisks).contains(parts.count) else {
            throw SwiftletError(.invalidFormat, "\(what) describes a root of \(parts.count) layers")
        }
        return try parts.map { part throws(SwiftletError) -> String in
            let file = root + "/disks/" + part
            guard PackManifest.isPlainName(part), access(file, F_OK) == 0 else {
                throw SwiftletError(.invalidFormat, "\(what) names the layer \(part.debugDescription), which it does not hold")
            }
            return file
        }
    }

    /// An image's description in an image pack (`image` part): its layers by part name.
    struct PackedImage: Codable {
        var name: String
        var defaults: ExecDefaults
        var layers: [String]
        /// The CPU baseline its machines boot with (nil: the host's CPU; a run may say otherwise).
        var cpuTemplate: CPUTemplate?
    }

    static let imagePart = "image", kernelPart = "kernel", agentPart = "agent"

    /// Packs an image (a registry reference, layout, archive or store digest, pulled when needed;
    /// nil: the default image) with the kernel and agent initramfs this Swiftlet boots, into a
    /// new file at `output`: it boots the same on any host with Swiftlet.
    /// With `cpuTemplate`, its machines boot with that CPU baseline (unless a run names another).
    public static func create(image: String?, insecureRegistry: Bool = false, to output: String, executable: String? = nil,
                              cpuTemplate: CPUTemplate? = nil,
                              progress: @escaping @Sendable (String) -> Void = { _ in }) throws(SwiftletError) -> Report {
        let root = try RootFilesystem.resolve(image: image, rootfs: nil, insecure: insecureRegistry, progress: progress)
        var sources: [(name: String, path: String)] = [(kernelPart, GuestAssets.defaultKernel()), (agentPart, GuestAssets.agentInitrd)]
        let layers = try addReadOnlyDisks(root.disks, to: &sources)
        let description = PackedImage(name: image ?? "default", defaults: root.defaults, layers: layers, cpuTemplate: cpuTemplate)
        return try write(kind: .image, to: output, executable: executable, parts: sources, bytes: [(imagePart, try encode(description))])
    }

    static func encode(_ value: some Encodable) throws(SwiftletError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        do { return Array(try encoder.encode(value)) } catch {
            throw SwiftletError(.invalidFormat, "cannot encode a pack's description: \(error)")
        }
    }

    static func partName(_ disk: SnapshotPaths.RecordedDisk) -> String {
        switch disk {
        case .layer(let diffID): layerPrefix + diffID.hex
        case .defaultImage: defaultImagePart
        }
    }

    /// A pack unpacked into a private directory (mode 0700): `snapshot/` (a snapshot pack's
    /// files), `disks/` (read-only disks) and a machine's or image's own parts. Removed when this
    /// value goes, unless kept (a machine's `pack/`).
    public final class Unpacked: Sendable {
        /// The snapshot directory (state, memory, disks, working set).
        public let snapshotDirectory: String
        /// What the pack holds.
        public let kind: PackManifest.Kind
        /// The pack's read-only disks for a restore of it: the disks the snapshot recorded,
        /// mapped by their form (layer digest, default image) to the pack's own copies.
        public let readOnlyDisks: SnapshotDiskResolver
        /// A snapshot pack unpacked without its memory: the memory, read from the pack a chunk
        /// at a time as the restored guest touches it (`Machine.restoring(lazyMemory:)`).
        public let lazyMemory: (any MemoryImageSource)?
        /// Each part's digest (`PackPart.sha256`), by name.
        let partDigests: [String: [UInt8]]
        let root: String
        /// Whether the directory stays when this value goes (a machine's `pack/`).
        private let kept: Atomic<Bool>
        /// An entry of `UnpackArea`: its lock, held for as long as this value lives (-1: none).
        private let areaLock: Int32

        init(root: String, layers: [String: String], kind: PackManifest.Kind = .snapshot, kept: Bool = false,
             lazyMemory: (any MemoryImageSource)? = nil, partDigests: [String: [UInt8]] = [:], areaLock: consuming OwnedFileDescriptor? = nil) {
            self.areaLock = areaLock?.release() ?? -1
            self.root = root
            self.kind = kind
            self.lazyMemory = lazyMemory
            self.partDigests = partDigests
            self.kept = Atomic(kept)
            self.snapshotDirectory = root + "/snapshot"
            readOnlyDisks = Self.resolver(layers: layers, root: root)
        }

        /// Maps a snapshot's recorded read-only disks, by their form (layer digest, default
        /// image), to `layers` (part name → file) and nothing else.
        static func resolver(layers: [String: String], root: String) -> SnapshotDiskResolver {
            SnapshotDiskResolver { recorded throws(SwiftletError) in
                guard let disk = SnapshotPaths.RecordedDisk(recorded) else { throw SnapshotPaths.unknownDisk(recorded) }
                guard let file = layers[MachinePack.partName(disk)] else {
                    throw SwiftletError(.invalidFormat, "the pack's snapshot names the disk \(recorded), which the pack does not hold (\(root))")
                }
                return file
            }
        }

        deinit {
            if areaLock >= 0 {
                UnpackArea.release(root) // the directory and its lock file; then the lock goes
                _ = OwnedFileDescriptor(taking: areaLock)
            } else if !kept.load(ordering: .acquiring) {
                try? FileTree.remove(root)
            }
        }

        /// An image pack's root, kernel and agent initramfs (untrusted: its description is
        /// checked; the kernel and initramfs are only ever the guest's).
        func image(what: String) throws(SwiftletError) -> PackedImageRoot {
            let image = try MachinePack.description(PackedImage.self, in: root + "/" + MachinePack.imagePart, what: what, kind: "image")
            guard image.name.utf8.count <= 4096 else { throw SwiftletError(.invalidFormat, "\(what) names its image with \(image.name.utf8.count) bytes") }
            let disks = try MachinePack.layerFiles(image.layers, unpackedAt: root, what: what)
            let kernel = root + "/" + MachinePack.kernelPart, agent = root + "/" + MachinePack.agentPart
            var contents: [String: String] = [:]
            for (path, name) in [(kernel, MachinePack.kernelPart), (agent, MachinePack.agentPart)] {
                if let digest = partDigests[name] { contents[path] = "pack-part-sha256:" + Hex.encode(digest) }
            }
            return PackedImageRoot(root: RootFilesystem(disks: disks, defaults: image.defaults, name: image.name),
                                   kernel: kernel, agent: agent, cpuTemplate: image.cpuTemplate, contents: contents)
        }

        /// Leaves the directory in place when this value goes.
        func keep() { kept.store(true, ordering: .releasing) }

        /// The directory's read-only disks for a pack unpacked earlier at `root` (a machine's
        /// `pack/`): the same mapping `unpack` gave, over the files that are there.
        static func readOnlyDisks(unpackedAt root: String) -> SnapshotDiskResolver {
            var layers: [String: String] = [:]
            for (name, isDirectory) in OwnedFileDescriptor.directoryEntries(root + "/disks") ?? [] where !isDirectory {
                layers[name] = root + "/disks/" + name
            }
            return resolver(layers: layers, root: root)
        }
    }

    /// An unpacked image pack: the root, kernel and agent initramfs its machines boot, and the
    /// CPU baseline they boot with.
    struct PackedImageRoot: Sendable {
        var root: RootFilesystem
        var kernel: String
        var agent: String
        var cpuTemplate: CPUTemplate?
        /// The kernel's and the agent's part digests, by their unpacked paths: what a boot
        /// template of them is keyed by (`BootTemplate(config:contents:)`).
        var contents: [String: String] = [:]
    }


    /// Checks the pack at `path` (a snapshot's or an image's: the parts its kind needs, and only
    /// parts it has) and unpacks it, every chunk checked, into a new private directory:
    /// under `$SWIFTLET_HOME/unpacked`, or with `outsideHome` a new temporary directory
    /// (`$TMPDIR`, else /var/tmp: a packed program has no home of its own).
    /// A damaged pack is refused with an error naming the part, and leaves nothing behind.
    ///
    /// With `lazyMemory`, a snapshot pack's memory is not unpacked where this process may use a
    /// userfaultfd: `Unpacked.lazyMemory` reads it from the pack as the restored guest touches
    /// it (each chunk checked then). Elsewhere it is unpacked with the rest.
    public static func unpack(_ path: String, outsideHome: Bool = false, lazyMemory: Bool = false) throws(SwiftletError) -> Unpacked {
        try unpack(path, into: nil, outsideHome: outsideHome, lazyMemory: lazyMemory)
    }

    /// `unpack`, into `directory` (which must not exist; it is made, 0700) when given, and kept
    /// there when the value goes (removed on a failure).
    static func unpack(_ path: String, into directory: String?, outsideHome: Bool = false,
                       lazyMemory: Bool = false) throws(SwiftletError) -> Unpacked {
        let reader = try PackReader(path: path)
        let kind = reader.manifest.kind
        guard kind != .machine || directory != nil else {
            throw SwiftletError(.invalidArgument, "\(path) is a pack of a stopped machine, without its memory: make a machine of it (`swiftlet machine create --name NAME --from \(path)`)")
        }
        guard kind != .image || directory == nil else {
            throw SwiftletError(.invalidArgument, "\(path) is a pack of an image: run it (`swiftlet run --image \(path)`); a machine is made of a machine's pack")
        }
        // Where each part goes; anything else is refused before a byte is written.
        var destinations: [(part: PackPart, file: String)] = []
        var layers: [String: String] = [:]
        let required = switch kind {
        case .snapshot: stateFiles
        case .machine: [machinePart, machineDiskPart]
        case .image: [imagePart, kernelPart, agentPart]
        }
        for name in required { _ = try reader.part(name) }
        // A host whose CPU cannot run the packed memory says so before a byte is unpacked (the
        // restore checks the snapshot's own CPUID again: the manifest is only a first look).
        if let contract = reader.manifest.cpu, let host = Machine.hostCPUID(kvmPath: AgentPort.kvmPath) {
            try contract.check(supported: host, what: "the machine in \(path)")
        }
        for part in reader.manifest.parts {
            let name = part.name
            if kind == .snapshot && (stateFiles.contains(name) || name == SnapshotDirectory.workingSetFileName || SnapshotDirectory.isDiskFileName(name)) {
                destinations.append((part, "/snapshot/" + name))
            } else if (kind == .machine && (name == machinePart || name == machineDiskPart))
                        || (kind == .image && [imagePart, kernelPart, agentPart].contains(name)) {
                destinations.append((part, "/" + name))
            } else if name == defaultImagePart || (name.hasPrefix(layerPrefix) && (try? Digest(parsing: "sha256:" + name.dropFirst(layerPrefix.count))) != nil) {
                destinations.append((part, "/disks/" + name))
                layers[name] = "/disks/" + name
            } else {
                throw SwiftletError(.invalidFormat, "\(path) holds a part \(name), which a \(kind.rawValue) pack does not have")
            }
        }
        // Checked: the directory is made, and removed again if what follows fails.
        let root: String
        var areaLock: OwnedFileDescriptor? = nil
        if let directory {
            root = directory
            try FileTree.makeDirectory(root)
        } else {
            let reserved = outsideHome ? try UnpackArea.reserve(prefix: "swiftlet-pack-", in: FileTree.temporaryParent, shared: true)
                                       : try UnpackArea.reserve()
            root = reserved.path
            areaLock = reserved.takeLock()
            do throws(SwiftletError) { try FileTree.makeDirectory(root) } catch {
                UnpackArea.release(root)
                throw error
            }
        }
        destinations = destinations.map { ($0.part, root + $0.file) }
        var memorySource: PackMemorySource?
        if lazyMemory, kind == .snapshot, UserFaultFD.isAvailable, let index = destinations.firstIndex(where: { $0.part.name == SnapshotDirectory.memoryFileName }) {
            let memory = destinations.remove(at: index).part
            try reader.checkChunkDigests(of: memory)
            memorySource = PackMemorySource(reader: reader, part: memory)
        }
        let unpacking = Unpacked(root: root, layers: layers.mapValues { root + $0 }, kind: kind, lazyMemory: memorySource,
                                 partDigests: Dictionary(reader.manifest.parts.map { ($0.name, $0.sha256) }, uniquingKeysWith: { first, _ in first }),
                                 areaLock: areaLock.take())
        try FileTree.makeDirectory(root + "/snapshot")
        try FileTree.makeDirectory(root + "/disks")
        for (part, file) in destinations {
            let output = try OwnedFileDescriptor.open(file, flags: O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600, what: "the unpacked \(part.name)")
            try reader.extract(part, to: output)
        }
        if directory != nil { unpacking.keep() } // complete: it stays
        return unpacking
    }

    /// What the pack at `path` holds: its manifest, checked (not its parts: `verify`), and where
    /// in the file it starts (after an executable: its size).
    public static func inspect(_ path: String) throws(SwiftletError) -> (manifest: PackManifest, start: UInt64, fileSize: UInt64) {
        let reader = try PackReader(path: path)
        return (reader.manifest, reader.start, reader.fileSize)
    }

    /// Reads and checks every byte of every part of the pack at `path`; returns the bytes checked.
    public static func verify(_ path: String) throws(SwiftletError) -> UInt64 {
        try PackReader(path: path).verify()
    }

    /// Whether `path` is a regular file that ends in a pack footer's magic (a cheap test, for
    /// telling a pack from an image archive; opening it checks the rest).
    public static func looksLikePack(_ path: String) -> Bool {
        guard let file = try? OwnedFileDescriptor.openRegularFile(path, flags: O_RDONLY | O_CLOEXEC, what: "file"),
              let size = try? file.size(), size >= UInt64(PackFooter.size),
              let magic = try? file.read(count: PackFooter.magic.count, at: size - UInt64(PackFooter.size), what: path) else { return false }
        return magic == PackFooter.magic
    }

}

extension MachinePack {
    /// Pushes the pack at `path` to the registry `reference` names (a tag) as an OCI artifact
    /// (docs/pack-format.md, Registries), through `swiftlet-pull` with the registry auth image
    /// pulls have (which refuses a reference by digest). The file is checked to be a pack first.
    /// Returns the manifest's digest.
    public static func push(_ path: String, to reference: String, insecureRegistry: Bool = false,
                            progress: @escaping @Sendable (String) -> Void = { _ in }, interruptions: Int32? = nil) throws(SwiftletError) -> String {
        let parsed = try ImageReference(parsing: reference)
        _ = try PackReader(path: path)
        return try RegistryPull.runHelper((insecureRegistry ? ["--insecure-registry"] : []) + ["--push-pack", FileTree.absolute(path), parsed.description],
                                          what: "push \(path)", progress: progress, interruptions: interruptions)
    }

    /// Pulls the pack `reference` names from its registry into `output` (replaced; written
    /// beside it and renamed into place once its digest matched), then checks that it is a pack
    /// (a file that is not is removed). Returns the manifest's digest.
    public static func pull(_ reference: String, to output: String, insecureRegistry: Bool = false,
                            progress: @escaping @Sendable (String) -> Void = { _ in }, interruptions: Int32? = nil) throws(SwiftletError) -> String {
        let parsed = try ImageReference(parsing: reference)
        let path = FileTree.absolute(output)
        let digest = try RegistryPull.runHelper((insecureRegistry ? ["--insecure-registry"] : []) + ["--pull-pack", parsed.description, path],
                                                what: "pull \(reference)", progress: progress, interruptions: interruptions)
        do throws(SwiftletError) {
            _ = try PackReader(path: path)
        } catch {
            try? FileTree.remove(path)
            throw SwiftletError(error.code, "\(reference) holds no Swiftlet pack that this Swiftlet reads (removed \(output)): \(error.message)")
        }
        return digest
    }
}

/// A snapshot pack's `memory` part as the source of a lazily restored machine's memory: each
/// chunk read, decompressed and checked against its digest when the guest first touches it.
final class PackMemorySource: MemoryImageSource, @unchecked Sendable {
    // SAFETY (Sendable): the reader (a descriptor and a decompression context) is used under `lock`.
    private let reader: PackReader
    private let part: PackPart
    private let lock = Mutex<Void>(())

    init(reader: PackReader, part: PackPart) {
        self.reader = reader
        self.part = part
    }

    var size: UInt64 { part.size }
    var chunkSize: Int { Int(part.chunkSize) }

    func isZero(chunk index: Int) -> Bool { part.chunks[index].encoding == .zero }

    func read(chunk index: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SwiftletError) {
        guard index >= 0, index < part.chunks.count, buffer.count == part.length(ofChunk: index) else {
            throw SwiftletError(.invalidArgument, "chunk \(index) of part \(part.name) of \(reader.path) was asked for with \(buffer.count) bytes")
        }
        try lock.withLock { _ throws(SwiftletError) in try reader.readChunk(index, of: part, into: buffer) }
    }
}
