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
            let normalized = "/" + mount.guestPath.split(separator: "/").joined(separator: "/")
            guard seen.insert(normalized).inserted else {
                throw SwiftletError(.invalidArgument, "--volume: two volumes at \(normalized) in the guest")
            }
        }
    }

    /// `swiftlet.volumes=` for the agent: each guest path as hex (any byte survives the command
    /// line), `+ro` for a read-only one, in volume order (volume N is `vN` in the file system's root).
    public static func commandLineOption(_ mounts: [VolumeMount]) -> String {
        let entries = mounts.map { Hex.encode(Array($0.guestPath.utf8)) + ($0.readOnly ? "+ro" : "") }
        return "swiftlet.volumes=" + entries.joined(separator: ",")
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
        volumes = mounts.map { SharedVolume(path: $0.hostPath, readOnly: $0.readOnly) }
        commandLine += " " + VolumeMount.commandLineOption(mounts)
    }
}
