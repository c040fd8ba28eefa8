import Devices
import Glibc
import SwiftletSystem
import VMM

/// A host directory a machine's guest sees at a directory of its own (`-v HOST:GUEST[:ro]`),
/// served by the machine's virtio-fs device. The host directory is the user's choice, made on
/// the command line or through the library, never read from an image, snapshot or pack.
public struct VolumeMount: Codable, Sendable, Equatable {
    /// The host directory, absolute (made so when parsed).
    public var hostPath: String
    /// Where the guest sees it: an absolute path, not `/`, without `.` or `..` components, and not
    /// under /proc, /sys or /dev.
    public var guestPath: String
    /// The guest may not change it (refused on the host side: EROFS).
    public var readOnly: Bool

    public init(hostPath: String, guestPath: String, readOnly: Bool) {
        self.hostPath = hostPath; self.guestPath = guestPath; self.readOnly = readOnly
    }

    /// Parses `HOST:GUEST` or `HOST:GUEST:ro` (or `:rw`); a relative HOST is taken from the
    /// current directory. The host directory must exist.
    public static func parse(_ text: String) throws(SwiftletError) -> VolumeMount {
        var parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        var readOnly = false
        if parts.count == 3, parts[2] == "ro" || parts[2] == "rw" {
            readOnly = parts[2] == "ro"
            parts.removeLast()
        }
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw SwiftletError(.invalidArgument, "--volume \(text): expected HOST_DIR:GUEST_DIR or HOST_DIR:GUEST_DIR:ro")
        }
        var host = parts[0]
        if !host.hasPrefix("/") {
            guard let cwd = getcwd(nil, 0) else { throw SwiftletError.system("getcwd", errno: currentErrno) }
            defer { free(cwd) }
            host = String(cString: cwd) + "/" + host
        }
        let mount = VolumeMount(hostPath: host, guestPath: parts[1], readOnly: readOnly)
        try mount.validate()
        return mount
    }

    /// Checks the guest path, and that the host directory is a directory now.
    public func validate() throws(SwiftletError) {
        let components = guestPath.split(separator: "/", omittingEmptySubsequences: true)
        guard guestPath.hasPrefix("/"), !components.isEmpty, !components.contains(where: { $0 == "." || $0 == ".." }),
              !guestPath.utf8.contains(0), guestPath.utf8.count < 1024 else {
            throw SwiftletError(.invalidArgument, "--volume guest directory \(guestPath): use an absolute path other than / without . or ..")
        }
        guard !["proc", "sys", "dev"].contains(String(components[0])) else {
            throw SwiftletError(.invalidArgument, "--volume guest directory \(guestPath): /proc, /sys and /dev belong to the guest's kernel")
        }
        var st = stat()
        guard stat(hostPath, &st) == 0 else {
            throw SwiftletError.system("--volume \(hostPath): cannot use the host directory", errno: currentErrno)
        }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            throw SwiftletError(.invalidArgument, "--volume \(hostPath): not a directory")
        }
    }

    /// Checks a list: each mount, their number, and no guest path twice.
    public static func validate(_ mounts: [VolumeMount]) throws(SwiftletError) {
        guard mounts.count <= MachineConfig.maximumVolumes else {
            throw SwiftletError(.invalidArgument, "\(mounts.count) volumes are more than Swiftlet supports (\(MachineConfig.maximumVolumes))")
        }
        var seen = Set<String>()
        for mount in mounts {
            try mount.validate()
            let normalized = mount.normalizedGuestPath
            guard seen.insert(normalized).inserted else {
                throw SwiftletError(.invalidArgument, "--volume: two volumes at \(normalized) in the guest")
            }
        }
    }

    /// The guest path as the agent mounts it (no repeated or trailing slashes).
    var normalizedGuestPath: String { "/" + guestPath.split(separator: "/").joined(separator: "/") }

    /// `given` in the order of `saved` (the volumes a snapshot's machine had, by guest path):
    /// the same guest directories, each read-only where it was. `what` names the snapshot.
    static func matching(_ given: [VolumeMount], saved: [VolumeMount], what: String) throws(SwiftletError) -> [VolumeMount] {
        let wanted = saved.map { "-v HOST_DIR:\($0.normalizedGuestPath)\($0.readOnly ? ":ro" : "")" }.joined(separator: " ")
        guard given.count == saved.count else {
            throw SwiftletError(.invalidArgument, saved.isEmpty
                ? "the machine in \(what) shared no host directories: it cannot be given volumes"
                : "the machine in \(what) shared host directories, which a snapshot does not hold: give them again (\(wanted))")
        }
        var ordered: [VolumeMount] = []
        for volume in saved {
            guard let mount = given.first(where: { $0.normalizedGuestPath == volume.normalizedGuestPath }) else {
                throw SwiftletError(.invalidArgument, "the machine in \(what) shared host directories at other guest paths: give \(wanted)")
            }
            guard mount.readOnly == volume.readOnly else {
                throw SwiftletError(.invalidArgument, "the machine in \(what) had \(volume.normalizedGuestPath) \(volume.readOnly ? "read-only" : "writable"), and its guest mounted it so: give \(mount.hostPath):\(volume.normalizedGuestPath)\(volume.readOnly ? ":ro" : "")")
            }
            ordered.append(mount)
        }
        return ordered
    }

    /// `swiftlet.volumes=` for the agent: each guest path as hex (any byte survives the command
    /// line), `+ro` for a read-only one, in volume order (volume N is `vN` in the file system's root).
    public static func commandLineOption(_ mounts: [VolumeMount]) -> String {
        let entries = mounts.map { Hex.encode(Array($0.guestPath.utf8)) + ($0.readOnly ? "+ro" : "") }
        return "swiftlet.volumes=" + entries.joined(separator: ",")
    }
}

extension VolumeMount {
    /// The virtio-fs device's volumes for `mounts`, in order.
    static func shared(_ mounts: [VolumeMount]) -> [SharedVolume] {
        mounts.map { SharedVolume(path: $0.hostPath, readOnly: $0.readOnly) }
    }
}

extension VolumeMount: CustomStringConvertible {
    /// As `-v` takes it.
    public var description: String { hostPath + ":" + guestPath + (readOnly ? ":ro" : "") }
}

extension MachineConfig {
    /// Shares `mounts` with the guest: the virtio-fs device's volumes and the agent's option.
    public mutating func share(_ mounts: [VolumeMount]) {
        guard !mounts.isEmpty else { return }
        volumes = VolumeMount.shared(mounts)
        commandLine += " " + VolumeMount.commandLineOption(mounts)
    }
}
