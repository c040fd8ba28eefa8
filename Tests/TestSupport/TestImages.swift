import Glibc

/// The OCI images scripts/build-test-images makes (cached outside the clone): $SWIFTLET_TEST_IMAGES,
/// else the script's output (it builds them on first use).
public enum TestImages {
    public static let directory: String? = {
        if let dir = TestHost.environment("SWIFTLET_TEST_IMAGES"), !dir.isEmpty { return dir }
        let r = Subprocess.run([repositoryRoot + "/scripts/build-test-images"], timeout: 600)
        guard r.status == 0 else { return nil }
        return r.stdout.split(separator: "\n").last.map(String.init)
    }()

    /// The repository's root, from this file's path.
    public static var repositoryRoot: String {
        var path = Substring(#filePath)
        for _ in 0..<3 { path = path[..<(path.lastIndex(of: "/") ?? path.startIndex)] }
        return String(path)
    }

    /// `layout`, `zstd`, `docker-save.tar`, `oci-archive.tar`, `multiarch`, `arm64` (see the script).
    public static func path(_ name: String) -> String { (directory ?? "/nonexistent") + "/" + name }
}

/// A real OCI registry (Debian's docker-registry) on a loopback port, for the life of the value,
/// optionally with htpasswd (basic) authentication.
public final class LocalRegistry: @unchecked Sendable {
    public let port: Int
    public let directory = TemporaryDirectory()
    private let pid: Int32

    /// The user and password of a registry started with `authenticated: true`.
    public static let user = "swiftlet", password = "swiftlet-test-password"
    // bcrypt of `password` (cost 5), made once with Python's bcrypt.
    static let passwordHash = "$2y$05$Y.VdWFPXFpSFbL/7EJMLZeYL99EiUOa2YHW.4U4uQgtDfROflYLb."

    public init?(authenticated: Bool = false) {
        guard access("/usr/bin/docker-registry", X_OK) == 0 else { return nil }
        var started: (Int, Int32)?
        for _ in 0..<5 where started == nil {
            let port = LocalRegistry.freePort()
            var config = """
                version: 0.1
                log: {level: error}
                storage:
                  filesystem: {rootdirectory: \(directory.path)/data}
                  delete: {enabled: true}
                http: {addr: "127.0.0.1:\(port)"}

                """
            if authenticated {
                directory.write("htpasswd", Array("\(Self.user):\(Self.passwordHash)\n".utf8))
                config += "auth:\n  htpasswd: {realm: swiftlet-test, path: \(directory.path)/htpasswd}\n"
            }
            directory.write("config.yml", Array(config.utf8))
            let r = Subprocess.run(["/bin/sh", "-c", "/usr/bin/docker-registry serve \"$0\" >\"$1\" 2>&1 </dev/null & echo $!",
                                    directory.path + "/config.yml", directory.path + "/log"])
            guard let pid = Int32(r.stdout.trimmingCharacters) else { continue }
            if LocalRegistry.waitForPort(port) { started = (port, pid) } else { kill(pid, SIGKILL) }
        }
        guard let started else { return nil }
        (port, pid) = started
    }

    deinit {
        kill(pid, SIGTERM)
        var status: Int32 = 0
        _ = waitpid(pid, &status, WNOHANG)
    }

    public var host: String { "127.0.0.1:\(port)" }

    /// Copies an image into the registry with skopeo (`oci:DIR:TAG`, `oci-archive:...`) as NAME:TAG.
    public func push(_ source: String, as name: String, all: Bool = false) -> Subprocess {
        var arguments = ["/usr/bin/skopeo", "copy", "-q", "--dest-tls-verify=false"]
        if all { arguments.append("--all") }
        if access(directory.path + "/htpasswd", F_OK) == 0 { arguments += ["--dest-creds", "\(Self.user):\(Self.password)"] }
        return Subprocess.run(arguments + [source, "docker://\(host)/\(name)"], timeout: 120)
    }

    /// A loopback port nothing listens on (bound and released).
    public static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Waits up to 10 s for something to accept connections on the loopback port.
    public static func waitForPort(_ port: Int) -> Bool {
        for _ in 0..<200 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = UInt16(port).bigEndian
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            close(fd)
            if connected == 0 { return true }
            usleep(50_000)
        }
        return false
    }
}

/// A bearer-token front for a registry (Tests/Fixtures/token-proxy.py): answers 401 with a Bearer
/// challenge, issues a token, and passes requests carrying it to the registry.
public final class TokenProxy: @unchecked Sendable {
    public let port: Int
    private let pid: Int32
    private let log = TemporaryDirectory()

    public init?(registryPort: Int) {
        let port = LocalRegistry.freePort()
        let script = TestImages.repositoryRoot + "/Tests/Fixtures/token-proxy.py"
        let r = Subprocess.run(["/bin/sh", "-c", "/usr/bin/python3 \"$0\" \"$1\" \"$2\" >\"$3\" 2>&1 </dev/null & echo $!",
                                script, String(port), String(registryPort), log.path + "/log"])
        guard let pid = Int32(r.stdout.trimmingCharacters), LocalRegistry.waitForPort(port) else { return nil }
        self.port = port
        self.pid = pid
    }

    deinit { kill(pid, SIGTERM) }

    public var host: String { "127.0.0.1:\(port)" }
}

extension String {
    var trimmingCharacters: String { String(filter { !$0.isWhitespace }) }
}
