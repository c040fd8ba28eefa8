import CGuestSupport
import Glibc

/// What the host put on the kernel command line for the agent.
struct BootOptions {
    /// The image's layer disks, bottom first (`swiftlet.root=/dev/vda,/dev/vdb`), stacked read-only
    /// under the root's writable layer; empty to stay in the initramfs.
    var root: [String] = []
    var rootType: String?
    /// A writable ext4 disk for the root's upper layer (`swiftlet.upper=/dev/vdc`), so writes
    /// outlive the VM; without it they go to memory (tmpfs).
    var upper: String?
    var hostPort: UInt32 = 1024
    var hostname = "swiftlet"
    /// Host directories to mount (`swiftlet.volumes=HEX[+ro],...`: each guest directory's bytes
    /// in hex), volume N being `vN` in the virtio-fs file system tagged `swiftlet`.
    var volumes: [(path: String, readOnly: Bool)] = []

    init(commandLine: String) {
        for word in commandLine.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
            guard let equals = word.firstIndex(of: "=") else { continue }
            let key = word[..<equals], value = String(word[word.index(after: equals)...])
            switch key {
            case "swiftlet.root": root = value.split(separator: ",").map(String.init)
            case "swiftlet.rootfstype": rootType = value
            case "swiftlet.upper": upper = value
            case "swiftlet.port": hostPort = UInt32(value) ?? hostPort
            case "swiftlet.hostname": hostname = value
            case "swiftlet.volumes": volumes = value.split(separator: ",").map(Self.volume)
            default: break
            }
        }
    }
}

extension BootOptions {
    /// One `swiftlet.volumes` entry: hex of the guest path, then `+ro` for a read-only one (a
    /// malformed entry gives an empty path, which is refused when mounting).
    static func volume(_ entry: Substring) -> (path: String, readOnly: Bool) {
        let readOnly = entry.hasSuffix("+ro")
        let hex = Array((readOnly ? entry.dropLast(3) : entry).utf8)
        var bytes: [UInt8] = []
        func digit(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: c - 0x30
            case 0x61...0x66: c - 0x61 + 10
            default: nil
            }
        }
        guard hex.count % 2 == 0 else { return ("", readOnly) }
        for i in stride(from: 0, to: hex.count, by: 2) {
            guard let high = digit(hex[i]), let low = digit(hex[i + 1]) else { return ("", readOnly) }
            bytes.append(high << 4 | low)
        }
        return (String(decoding: bytes, as: UTF8.self), readOnly)
    }
}

enum GuestSetup {
    static func run(_ options: BootOptions) {
        if access("/proc/self", F_OK) != 0 { mountOrDie("proc", "/proc", "proc") } // /init usually did
        mountOrDie("sysfs", "/sys", "sysfs")
        mountOrDie("devtmpfs", "/dev", "devtmpfs")
        if !options.root.isEmpty, let failure = switchRoot(to: options.root, type: options.rootType, upper: options.upper,
                                                            volumes: options.volumes) {
            Log.fatal(failure)
        }
        makeDirectory("/dev/pts")
        mountOrDie("devpts", "/dev/pts", "devpts", data: "newinstance,ptmxmode=0666,mode=0620")
        makeDirectory("/dev/shm")
        mountOrDie("tmpfs", "/dev/shm", "tmpfs", flags: UInt(MS_NOSUID | MS_NODEV))
        if access("/dev/ptmx", F_OK) != 0 { symlink("pts/ptmx", "/dev/ptmx") }
        for (link, target) in [("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                               ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")] where access(link, F_OK) != 0 {
            symlink(target, link)
        }
        _ = options.hostname.withCString { sethostname($0, strlen($0)) }
        // The loopback interface, for programs that talk to themselves over localhost, with or
        // without a network (the kernel gives it 127.0.0.1 and ::1 as it comes up).
        let loopback = guest_net_up("lo")
        if loopback != 0 { Log.write("cannot bring up lo: \(String(cString: strerror(-loopback)))") }
        // Children are reaped through a signalfd; block the signal so it queues there.
        guest_block_signal(SIGCHLD)
    }

    /// Why the root cannot be switched now (it already was, or this is no guest's init), or nil.
    static var rootSwitchRefusal: String? {
        guard getpid() == 1 else { return "the agent is not the guest's init: it has no root to change" }
        let type = guest_filesystem_type("/")
        guard type >= 0 else { return "cannot inspect the root: \(String(cString: strerror(Int32(-type))))" }
        let overlayMagic = 0x794c_7630
        return type == overlayMagic ? "the machine already has its root filesystem" : nil
    }

    /// Stacks a writable layer (the `upper` disk, else a tmpfs) over the read-only layer disks and
    /// makes the result the root (the mounts under /proc, /sys and /dev move with it). Returns why
    /// it could not, or nil.
    static func switchRoot(to layers: [String], type: String?, upper: String?, volumes: [(path: String, readOnly: Bool)] = []) -> String? {
        for directory in ["/mnt", "/mnt/layers", "/mnt/rw", "/mnt/root"] {
            if let failure = makeDirectoryOrFail(directory) { return failure }
        }
        var lowerDirectories: [String] = []
        for (index, device) in layers.enumerated() {
            let target = "/mnt/layers/\(index)"
            if let failure = makeDirectoryOrFail(target) { return failure }
            var mounted = false
            for fs in type.map({ [$0] }) ?? ["erofs", "ext4"] where !mounted {
                mounted = mount(device, target, fs, UInt(MS_RDONLY), nil) == 0
            }
            guard mounted else { return "cannot mount the image disk \(device): \(String(cString: strerror(errno)))" }
            lowerDirectories.append(target)
        }
        if let upper {
            guard mount(upper, "/mnt/rw", "ext4", 0, nil) == 0 else {
                return "cannot mount the machine's writable disk \(upper): \(String(cString: strerror(errno)))"
            }
        } else if mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755") != 0 {
            return "cannot mount the root's writable layer: \(String(cString: strerror(errno)))"
        }
        for directory in ["/mnt/rw/upper", "/mnt/rw/work"] {
            if let failure = makeDirectoryOrFail(directory) { return failure }
        }
        // overlayfs lists lower layers top first.
        let lower = lowerDirectories.reversed().joined(separator: ":")
        guard mount("overlay", "/mnt/root", "overlay", 0, "lowerdir=\(lower),upperdir=/mnt/rw/upper,workdir=/mnt/rw/work") == 0 else {
            return "cannot stack the image's layers (overlayfs): \(String(cString: strerror(errno)))"
        }
        if !volumes.isEmpty, let failure = mountVolumes(volumes, under: "/mnt/root") { return failure }
        for dir in ["/proc", "/sys", "/dev"] {
            _ = makeDirectoryOrFail("/mnt/root" + dir)
            guard mount(dir, "/mnt/root" + dir, nil, UInt(MS_MOVE), nil) == 0 else { return "cannot move \(dir) into the new root" }
        }
        _ = makeDirectoryOrFail("/mnt/root/tmp")
        chmod("/mnt/root/tmp", 0o1777)
        guard chdir("/mnt/root") == 0, mount(".", "/", nil, UInt(MS_MOVE), nil) == 0, chroot(".") == 0, chdir("/") == 0 else {
            return "cannot switch to the image root: \(String(cString: strerror(errno)))"
        }
        return nil
    }

    /// Mounts the host's file system (virtio-fs, tag `swiftlet`) at /mnt/volumes, outside the new
    /// root, and binds each volume `vN` to its directory under `root` (made if missing), read-only
    /// where asked (the host refuses writes to those too). Returns why it could not, or nil.
    static func mountVolumes(_ volumes: [(path: String, readOnly: Bool)], under root: String) -> String? {
        if let failure = makeDirectoryOrFail("/mnt/volumes") { return failure }
        // The device's driver may still be registering the tag when init starts: a few tries.
        var tries = 0
        while mount("swiftlet", "/mnt/volumes", "virtiofs", 0, nil) != 0 {
            tries += 1
            guard tries < 50 else { return "cannot mount the host's directories (virtiofs): \(String(cString: strerror(errno)))" }
            usleep(20_000)
        }
        raiseReadahead(of: "/mnt/volumes")
        for (index, volume) in volumes.enumerated() {
            let components = volume.path.split(separator: "/")
            guard volume.path.hasPrefix("/"), !components.isEmpty, !components.contains(where: { $0 == "." || $0 == ".." }) else {
                return "volume \(index): \"\(volume.path)\" is not a directory the guest can have"
            }
            var path = root
            for component in components {
                path += "/" + component
                if access(path, F_OK) != 0, let failure = makeDirectoryOrFail(path) { return failure }
            }
            guard mount("/mnt/volumes/v\(index)", path, nil, UInt(MS_BIND), nil) == 0 else {
                return "cannot mount the host directory at \(volume.path): \(String(cString: strerror(errno)))"
            }
            if volume.readOnly, mount("none", path, nil, UInt(MS_REMOUNT | MS_BIND | MS_RDONLY), nil) != 0 {
                return "cannot make \(volume.path) read-only: \(String(cString: strerror(errno)))"
            }
        }
        return nil
    }

    /// Reads ahead up to 4 MiB on the file system mounted at `path` (best effort): FUSE starts
    /// at 128 KiB, and each read request crosses to the host; with 4 MiB, four 1 MiB requests
    /// are in flight while the reader copies out the last (measured in the nested test host: a
    /// sequential read twice as fast as with 1 MiB, no faster with 8 or 16).
    static func raiseReadahead(of path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return }
        let device = UInt64(st.st_dev)
        let major = (device >> 8) & 0xfff | (device >> 32) & ~UInt64(0xfff)
        let minor = device & 0xff | (device >> 12) & ~UInt64(0xff)
        let fd = open("/sys/class/bdi/\(major):\(minor)/read_ahead_kb", O_WRONLY)
        guard fd >= 0 else { return }
        _ = "4096".withCString { write(fd, $0, 4) }
        close(fd)
    }

    /// Waits until the kernel sees each of `devices` with a non-zero size (a disk that just went
    /// into an empty drive: the driver learns it from a configuration-change interrupt, handled
    /// in a work queue). Returns why it gave up, or nil.
    static func waitForDisks(_ devices: [String], timeoutMilliseconds: Int = 10_000) -> String? {
        for device in devices {
            guard device.hasPrefix("/dev/"), !device.dropFirst(5).contains("/") else { return "\(device) is not a disk device" }
            let sizePath = "/sys/block/\(device.dropFirst(5))/size"
            let deadline = monotonicMilliseconds() + timeoutMilliseconds
            while true {
                guard let text = try? readText(sizePath) else { return "no disk \(device) in this machine" }
                if let sectors = Int(text.split(separator: "\n").first ?? ""), sectors > 0 { break }
                guard monotonicMilliseconds() < deadline else { return "the disk \(device) is still empty after \(timeoutMilliseconds) ms" }
                usleep(100)
            }
        }
        return nil
    }

    /// Connects to the host; the host listens before the guest boots, so this normally succeeds at once.
    static func connectToHost(_ options: BootOptions) -> Int32 {
        for _ in 0..<200 {
            let fd = guest_vsock_connect(2, options.hostPort)
            if fd >= 0 { return fd }
            usleep(10_000)
        }
        Log.fatal("cannot connect to the host on vsock port \(options.hostPort)")
    }

    static func powerOff() -> Never {
        sync()
        guest_power_off()
        exit(0)
    }

    static func mountOrDie(_ source: String, _ target: String, _ type: String, flags: UInt = 0, data: String? = nil) {
        let result = data.map { d in d.withCString { mount(source, target, type, flags, $0) } } ?? mount(source, target, type, flags, nil)
        if result != 0 && errno != EBUSY { Log.fatal("cannot mount \(type) on \(target): \(String(cString: strerror(errno)))") }
    }

    static func monotonicMilliseconds() -> Int {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return now.tv_sec * 1000 + now.tv_nsec / 1_000_000
    }

    static func makeDirectory(_ path: String) {
        if let failure = makeDirectoryOrFail(path) { Log.fatal(failure) }
    }

    static func makeDirectoryOrFail(_ path: String) -> String? {
        mkdir(path, 0o755) != 0 && errno != EEXIST ? "cannot create \(path): \(String(cString: strerror(errno)))" : nil
    }
}

enum Log {
    static func write(_ text: String) {
        var line = "swiftlet-init: " + text + "\n"
        line.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }

    static func fatal(_ text: String) -> Never {
        write(text)
        if getpid() == 1 { GuestSetup.powerOff() }
        exit(1)
    }
}

func readText(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw Errno(errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += buffer[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

struct Errno: Error { let code: Int32; init(_ code: Int32) { self.code = code } }
