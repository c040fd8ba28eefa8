import Glibc

/// Where Swiftlet's build puts the guest kernel and the demo initramfs: a cache outside any
/// checkout, `$SWIFTLET_CACHE`, else `$XDG_CACHE_HOME/swiftlet`, else `~/.cache/swiftlet`.
public enum GuestAssets {
    public static var cacheDirectory: String {
        if let dir = environment("SWIFTLET_CACHE"), !dir.isEmpty { return dir }
        if let xdg = environment("XDG_CACHE_HOME"), !xdg.isEmpty { return xdg + "/swiftlet" }
        return (environment("HOME") ?? "/root") + "/.cache/swiftlet"
    }

    /// The kernel built by `make kernel` (scripts/build-kernel): `vmlinux`, or `bzImage`.
    public static func defaultKernel(bzImage: Bool = false) -> String {
        cacheDirectory + "/kernel/default/" + (bzImage ? "bzImage" : "vmlinux")
    }

    /// The busybox demo initramfs built by scripts/build-initramfs.
    public static var defaultInitrd: String { cacheDirectory + "/initramfs/default/initramfs.cpio" }

    /// The guest agent's initramfs built by scripts/build-agent (`swiftlet run` boots it).
    public static var agentInitrd: String { cacheDirectory + "/agent/default/initramfs.cpio" }

    /// The default root filesystem for `swiftlet run`: busybox, built by scripts/build-default-image.
    public static var defaultImage: String { cacheDirectory + "/images/default/rootfs.erofs" }

    /// Resolves symlinks, so users see the content-addressed directory.
    public static func resolve(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
}
