import Glibc
import Images
import MachineState
import SwiftletSystem
import VMM

/// A booted machine saved before it had a root filesystem, so that `run` need not boot.
///
/// The first `run` of a machine shape boots the kernel with the guest agent and empty drives (no
/// root disk yet), and when the agent is ready snapshots the machine into
/// `$SWIFTLET_HOME/templates/KEY`, then goes on. Every later `run` of the same shape restores that
/// snapshot instead (memory mapped copy-on-write), puts the image's layer disks into the empty
/// drives (the guest sees their capacity change) and asks the agent to mount them as its root.
/// Which image is run does not matter to the template: only its number of layers does.
///
/// KEY digests everything the saved machine depends on: the kernel, initramfs and this executable
/// (path, size, modification time, inode), the command line, vCPUs, memory, drives and whether it
/// has a network device. A template
/// that cannot be restored is deleted and the run boots instead (and saves a new one); saving a
/// template deletes those made from files that have since been replaced.
///
/// Every machine started from one template shares its kernel's address-space layout (KASLR) and
/// its early random state; the agent reseeds the kernel's generator with host randomness on every
/// start (`identity`), but a workload that must not share layout with other VMs should use `--cold`.
public struct BootTemplate: Sendable {
    /// Changes when what a template holds changes meaning (the CLI's side of it).
    static let format = 1
    let directory: SnapshotDirectory

    static var root: String { ImageStore.defaultRoot() + "/templates" }

    /// The files the template's machine was made from, one per line as `fileLine` writes them;
    /// kept in the template as `inputs`, so that templates of replaced files can be found.
    let inputs: String

    /// The template for machines booted with `config` (whose disks are all empty drives).
    /// `contents` names files by their contents instead of by where they are (an image pack's
    /// kernel and agent, unpacked anew for each run: by their part's digest), so the template
    /// serves every run of them.
    init(config: MachineConfig, contents: [String: String] = [:]) {
        inputs = [config.kernelPath, config.initrdPath ?? "", Self.executablePath].map { path in
            contents[path].map { Self.contentLine($0) } ?? Self.fileLine(path)
        }.joined()
        var key = "swiftlet-boot-template \(Self.format)\n" + inputs
        key += "\(config.commandLine)\ncpus \(config.cpuCount) memory \(config.memoryMiB) drives \(config.disks.count)"
        key += " entropy \(config.entropyDevice) vsock \(config.vsock.map { String($0.guestCID) } ?? "none")\n"
        // The NIC is part of the saved hardware (its MAC and MTU are in the guest's driver); its
        // policy and backend are not: a restore joins it to the run's own.
        key += "network \(config.network.map { "\($0.guest.guestMAC) mtu \($0.guest.mtu)" } ?? "none")\n"
        if let template = config.cpuTemplate { key += "cpu-template \(template.rawValue)\n" }
        if config.balloon { key += "balloon\n" }
        directory = SnapshotDirectory(Self.root + "/" + SnapshotID(bytes: Array(SHA256.hash(Array(key.utf8)).prefix(16))).description)
    }

    private init(directory: String) {
        self.directory = SnapshotDirectory(directory)
        inputs = ""
    }

    /// This swiftlet executable's path (the link /proc/self/exe would name another executable when
    /// the stale templates are looked for by another swiftlet).
    static var executablePath: String { (try? FileTree.currentExecutable()) ?? "/proc/self/exe" }

    /// `path`, and what tells this version of the file from another: device, inode, size, mtime.
    static func fileLine(_ path: String) -> String {
        var info = stat()
        guard stat(path, &info) == 0 else { return "\(path) missing\n" }
        return "\(path) \(info.st_dev) \(info.st_ino) \(info.st_size) \(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)\n"
    }

    /// A file known by its contents' digest: it cannot become stale.
    static func contentLine(_ digest: String) -> String { "contents \(digest)\n" }

    var exists: Bool { directory.exists }

    /// Saves `machine` (running, its agent ready and rootless) as this template. Concurrent runs
    /// may save the same template: each writes its own directory and the first rename wins.
    func save(_ machine: Machine) throws(SwiftletError) {
        try makeDirectories(Self.root, mode: 0o700)
        // The snapshot goes to a name of its own, gets its `inputs`, and only then becomes the template.
        let partial = SnapshotDirectory(directory.path + ".partial-" + (try SnapshotID.random()).description)
        _ = try machine.snapshotBlocking(to: partial.path)
        do throws(SwiftletError) {
            try OwnedFileDescriptor.writeSmallFileAtomically(partial.path + "/inputs", Array(inputs.utf8))
            try partial.commit(as: directory)
        } catch {
            partial.remove()
            // Another run saved it first: that one serves as well.
            guard error.cause == .directoryNotEmpty || error.cause == .fileExists else { throw error }
        }
        Self.removeStale()
    }

    /// Deletes the templates made from files that have since been replaced (a rebuilt kernel,
    /// agent or swiftlet): no run restores them again. Templates being saved are left alone.
    static func removeStale() {
        for (name, isDirectory) in OwnedFileDescriptor.directoryEntries(root) ?? [] where isDirectory && !name.contains(".") {
            let template = BootTemplate(directory: root + "/" + name)
            guard let recorded = try? OwnedFileDescriptor.readSmallTextFile(template.directory.path + "/inputs") else { continue }
            let current = recorded.split(separator: "\n").map { line in
                line.hasPrefix("contents ") ? String(line) + "\n" : fileLine(String(line.split(separator: " ").dropLast(4).joined(separator: " ")))
            }.joined()
            if current != recorded { template.remove() }
        }
    }

    /// Deletes every template (runs in progress keep theirs: their memory stays mapped); returns
    /// the bytes freed on disk.
    public static func removeAll() -> Int64 {
        var freed: Int64 = 0
        for (name, isDirectory) in OwnedFileDescriptor.directoryEntries(root) ?? [] where isDirectory {
            let directory = root + "/" + name
            for (file, _) in OwnedFileDescriptor.directoryEntries(directory) ?? [] {
                var info = stat()
                if stat(directory + "/" + file, &info) == 0 { freed += Int64(info.st_blocks) * 512 }
            }
            BootTemplate(directory: directory).remove()
        }
        return freed
    }

    /// Deletes the template (it could not be restored).
    func remove() {
        let doomed = directory.path + ".removed-" + ((try? SnapshotID.random())?.description ?? "\(getpid())")
        guard rename(directory.path, doomed) == 0 else { return }
        try? FileTree.remove(doomed)
    }
}
