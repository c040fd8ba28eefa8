import AsyncHTTPClient
import Glibc
@testable import ImageRegistry
import Images
import SwiftletSystem
import Testing
import TestSupport

/// A fake registry (Tests/Fixtures/credential-probe.py) that tries to draw the user's credentials
/// to a server of its choosing: they must go only to the registry's own origin, or over HTTPS.
@Suite(.enabled(if: access("/usr/bin/python3", X_OK) == 0 && access("/usr/bin/openssl", X_OK) == 0, "needs python3 and openssl"))
struct RegistryCredentialTests {
    let dir = TemporaryDirectory()
    static let credentials = (user: "alice", password: "secret")
    static let basic = "Basic YWxpY2U6c2VjcmV0" // alice:secret

    /// One probe server; its log lines are "SCHEME PATH AUTHORIZATION".
    final class Probe: @unchecked Sendable {
        let port: Int
        let logPath: String
        private let pid: Int32

        init?(mode: String, target: String = "", log: String, tls: (cert: String, key: String)? = nil) {
            let port = LocalRegistry.freePort()
            let script = TestImages.repositoryRoot + "/Tests/Fixtures/credential-probe.py"
            var arguments = [script, String(port), log, mode, target]
            if let tls { arguments += [tls.cert, tls.key] }
            let line = "/usr/bin/python3 \"$@\" >\"\(log).err\" 2>&1 </dev/null & echo $!"
            let r = Subprocess.run(["/bin/sh", "-c", line, "sh"] + arguments)
            guard let pid = Int32(r.stdout.filter { !$0.isWhitespace }), LocalRegistry.waitForPort(port) else { return nil }
            self.port = port
            self.logPath = log
            self.pid = pid
        }

        deinit { kill(pid, SIGTERM) }

        var lines: [String] {
            guard let file = fopen(logPath, "r") else { return [] }
            defer { fclose(file) }
            var out: [String] = []
            var buffer = [CChar](repeating: 0, count: 4096)
            while fgets(&buffer, Int32(buffer.count), file) != nil {
                out.append(String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
            }
            return out
        }
    }

    func pull(_ source: RegistrySource) async throws(SwiftletError) {
        _ = try await ImagePuller().pull(from: source, into: try ImageStore(root: dir.path + "/store"))
    }

    @Test func credentialsAreNotSentToAPlainHTTPRealmOnAnotherHost() async throws {
        let realm = try #require(Probe(mode: "sink", log: dir.path + "/realm.log"))
        let registry = try #require(Probe(mode: "realm", target: "http://127.0.0.1:\(realm.port)/token", log: dir.path + "/registry.log"))
        let source = RegistrySource(reference: try ImageReference(parsing: "127.0.0.1:\(registry.port)/probe/image"),
                                    credentials: Self.credentials)
        await #expect { try await pull(source) } throws: { ($0 as! SwiftletError).code == .permissionDenied }
        // The token service was asked, anonymously.
        let asked = realm.lines.filter { $0.contains("/token") }
        #expect(!asked.isEmpty)
        #expect(asked.allSatisfy { $0.hasSuffix(" -\n") }, "\(asked)")
        #expect(!realm.lines.contains { $0.contains("Basic") }, "\(realm.lines)")
    }

    @Test func credentialsGoToARealmAtTheRegistrysOwnOrigin() async throws {
        // The registry names itself as its token service: the password may go there (and only there).
        let registry = try #require(Probe(mode: "realm", target: "self", log: dir.path + "/registry.log"))
        let source = RegistrySource(reference: try ImageReference(parsing: "127.0.0.1:\(registry.port)/probe/image"),
                                    credentials: Self.credentials)
        await #expect { try await pull(source) } throws: { ($0 as! SwiftletError).code == .permissionDenied }
        let lines = registry.lines
        #expect(lines.contains { $0.contains("/token") && $0.contains(Self.basic) }, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("http /v2/") && $0.contains("Bearer probe-token") }, "\(lines)")
    }

    /// A self-signed certificate for 127.0.0.1 and its key, made with openssl in the test's directory.
    func selfSignedCertificate() throws -> (cert: String, key: String) {
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        let made = Subprocess.run(["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                                   "-days", "1", "-keyout", key, "-out", cert])
        try #require(made.status == 0, "\(made.stderr)")
        return (cert, key)
    }

    @Test func credentialsDoNotSurviveARedirectToPlainHTTP() async throws {
        let (cert, key) = try selfSignedCertificate()
        let registry = try #require(Probe(mode: "redirect", target: "self-http", log: dir.path + "/registry.log", tls: (cert, key)))
        var configuration = HTTPClient.Configuration(certificateVerification: .none, redirectConfiguration: .disallow)
        configuration.connectionPool.retryConnectionEstablishment = false
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
        let source = RegistrySource(reference: try ImageReference(parsing: "127.0.0.1:\(registry.port)/probe/image"), scheme: "https",
                                    credentials: Self.credentials, client: client, timeout: .seconds(30))
        await #expect { try await pull(source) } throws: { ($0 as! SwiftletError).code == .notFound }
        try await client.shutdown()
        let lines = registry.lines
        // Over HTTPS the registry got the password; the same host over plain HTTP did not.
        #expect(lines.contains { $0.hasPrefix("https /v2/") && $0.contains(Self.basic) }, "\(lines)")
        let plain = lines.filter { $0.hasPrefix("http /v2/") }
        #expect(!plain.isEmpty, "\(lines)")
        #expect(plain.allSatisfy { $0.hasSuffix(" -\n") }, "\(plain)")
    }

    @Test func redirectsOnlyGoToHTTPAndHTTPS() async throws {
        let (cert, key) = try selfSignedCertificate()
        let registry = try #require(Probe(mode: "redirect", target: "file:///etc/passwd", log: dir.path + "/registry.log", tls: (cert, key)))
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup,
                                configuration: HTTPClient.Configuration(certificateVerification: .none, redirectConfiguration: .disallow))
        let source = RegistrySource(reference: try ImageReference(parsing: "127.0.0.1:\(registry.port)/probe/image"), scheme: "https",
                                    credentials: Self.credentials, client: client, timeout: .seconds(30))
        await #expect { try await pull(source) } throws: {
            ($0 as! SwiftletError).message.contains("redirected the manifest of 127.0.0.1:\(registry.port)/probe/image:latest to file:///etc/passwd, which is not an http or https URL")
        }
        try await client.shutdown()
    }

    @Test func theCredentialRulesByOrigin() throws {
        let https = RegistrySource(reference: try ImageReference(parsing: "registry.example.com/a/b"), credentials: Self.credentials)
        #expect(https.mayAuthorize("https://registry.example.com/v2/a/b/manifests/latest"))
        #expect(https.mayAuthorize("HTTPS://Registry.Example.com/v2/"))
        #expect(!https.mayAuthorize("http://registry.example.com/v2/a/b/manifests/latest"))
        #expect(!https.mayAuthorize("https://registry.example.com:444/v2/"))
        #expect(!https.mayAuthorize("https://registry.example.com@evil.example/v2/"))
        #expect(!https.mayAuthorize("https://blobs.example.com/x"))
        #expect(https.realmMayReceiveCredentials("https://auth.example.com/token"))
        #expect(!https.realmMayReceiveCredentials("http://auth.example.com/token"))
        #expect(!https.realmMayReceiveCredentials("http://registry.example.com/token"))
        let plain = RegistrySource(reference: try ImageReference(parsing: "registry.example.com/a/b"), insecure: true, credentials: Self.credentials)
        #expect(plain.mayAuthorize("http://registry.example.com/v2/"))
        #expect(plain.realmMayReceiveCredentials("http://registry.example.com/token"))
        #expect(!plain.realmMayReceiveCredentials("https://auth.example.com/token"))
        #expect(!plain.realmMayReceiveCredentials("http://127.0.0.1/token"))
        #expect(RegistrySource.resolve("/v2/x?next=http://evil/", against: "https://r.example/v2/y") == "https://r.example/v2/x?next=http://evil/")
        #expect(RegistrySource.resolve("https://cdn.example/blob", against: "https://r.example/v2/y") == "https://cdn.example/blob")
    }
}
