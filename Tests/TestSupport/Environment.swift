import Glibc

/// Facts about the test host that decide which tests can run.
public enum TestHost {
    /// Whether /dev/kvm (or $SWIFTLET_KVM_DEVICE) can be opened read-write.
    public static var hasKVM: Bool {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }

    /// Whether /dev/kvm is PVM-backed (no unmodified Linux guest boots; CPL0 code is emulated).
    public static var isPVM: Bool { access("/sys/module/kvm_pvm", F_OK) == 0 }

    /// Whether this run is the Linux-guest integration suite inside the nested test host.
    public static var integration: Bool { getenv("SWIFTLET_INTEGRATION").map { String(cString: $0) } == "1" }

    public static var isRoot: Bool { geteuid() == 0 }

    /// The `swiftlet` executable under test: $SWIFTLET_BIN, else `swiftlet` beside the test
    /// bundle (SwiftPM's build directory), else on PATH.
    public static var swiftletBinary: String {
        if let bin = getenv("SWIFTLET_BIN") { return String(cString: bin) }
        if let dir = buildDirectory, access(dir + "/swiftlet", X_OK) == 0 { return dir + "/swiftlet" }
        return "/usr/local/bin/swiftlet"
    }

    /// The example program (Examples/swiftlet-example) SwiftPM built beside the test bundle.
    public static var exampleBinary: String? {
        guard let dir = buildDirectory, access(dir + "/swiftlet-example", X_OK) == 0 else { return nil }
        return dir + "/swiftlet-example"
    }

    /// The directory that holds the test bundle: SwiftPM's build directory.
    static var buildDirectory: String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var dir = Substring(exe)
        while let slash = dir.lastIndex(of: "/") {
            dir = dir[..<slash]
            if !dir.hasSuffix(".xctest") && !dir.hasSuffix("Contents") && !dir.hasSuffix("MacOS") { break }
        }
        return String(dir)
    }

    /// The `swiftlet-init` executable SwiftPM built beside the test bundle ($SWIFTLET_INIT_BIN wins).
    public static var agentBinary: String {
        if let bin = getenv("SWIFTLET_INIT_BIN") { return String(cString: bin) }
        let swiftlet = swiftletBinary
        guard let slash = swiftlet.lastIndex(of: "/") else { return "swiftlet-init" }
        return String(swiftlet[..<slash]) + "/swiftlet-init"
    }

    public static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
}
