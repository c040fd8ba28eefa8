import AsyncHTTPClient
import FoundationEssentials
import Images
import NIOCore
import NIOHTTP1
import SwiftletSystem
import Synchronization

/// An image in a registry, through the OCI distribution API: manifests by tag or digest (OCI and
/// Docker v2, indexes and manifest lists), blobs streamed into the store, anonymous or bearer-token
/// auth (with credentials for the token service when given), and redirects to blob storage
/// followed without the registry's credentials.
///
/// Credentials belong to the registry the user named, and only to it (see `mayAuthorize` and
/// `realmMayReceiveCredentials`): the user's password and the registry's token go only to the
/// registry's own origin (its host and port, over the scheme the user chose: HTTPS, or plain HTTP
/// for a loopback registry or one named with --insecure-registry), never after a redirect to
/// another host or to plain HTTP; the password goes to a token service the registry names only
/// over HTTPS from an HTTPS registry (as Docker does), or to the registry's own origin. Other
/// token services are asked anonymously. Redirects are followed only to http and https URLs.
public final class RegistrySource: ImageSource, @unchecked Sendable {
    // SAFETY (Sendable): `token` is the only mutable state, guarded by `lock`.
    public let reference: ImageReference
    public let scheme: String
    let client: HTTPClient
    let credentials: (user: String, password: String)?
    let lock = Mutex<String?>(nil)
    let timeout: TimeAmount

    /// `insecure`: plain HTTP (also the default for loopback registries, as Docker does).
    public convenience init(reference: ImageReference, insecure: Bool = false, credentials: (user: String, password: String)? = nil,
                            client: HTTPClient = RegistrySource.defaultClient, timeout: TimeAmount = .seconds(300)) {
        self.init(reference: reference, scheme: insecure || reference.isLoopback ? "http" : "https", credentials: credentials,
                  client: client, timeout: timeout)
    }

    /// `scheme` as given (tests reach a loopback registry over HTTPS this way).
    package init(reference: ImageReference, scheme: String, credentials: (user: String, password: String)?,
                 client: HTTPClient, timeout: TimeAmount) {
        self.reference = reference
        self.scheme = scheme
        self.client = client
        self.credentials = credentials
        self.timeout = timeout
    }

    /// Swiftlet's HTTP client: redirects are followed by `get` (so credentials stay with the
    /// registry), and a registry that refuses connections fails at once rather than after retries.
    public static let defaultClient: HTTPClient = {
        var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow,
                                                     timeout: .init(connect: .seconds(15), read: .seconds(60)))
        configuration.connectionPool.retryConnectionEstablishment = false
        return HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
    }()

    public var displayName: String { reference.description }
    public var imageName: String? { reference.description }

    var base: String { "\(scheme)://\(reference.apiHost)/v2/\(reference.repository)" }

    static let acceptedManifests = [MediaType.ociIndex, MediaType.dockerManifestList, MediaType.ociManifest, MediaType.dockerManifest]

    public func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?) {
        let (bytes, type) = try await manifest(reference.manifestReference)
        if let digest = reference.digest, Digest.of(bytes) != digest {
            throw SwiftletError(.invalidFormat, "\(displayName): the registry's manifest does not match the digest asked for (got \(Digest.of(bytes)))")
        }
        return (bytes, type)
    }

    func manifest(_ reference: String) async throws(SwiftletError) -> ([UInt8], String?) {
        let response = try await get("\(base)/manifests/\(reference)", accept: Self.acceptedManifests, what: "the manifest of \(displayName)")
        var body: [UInt8] = []
        try await Self.collect(response, what: "the manifest of \(displayName)", limit: 16 << 20) { body += $0 }
        return (body, response.headers.first(name: "content-type"))
    }

    public func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError) {
        if store.hasBlob(descriptor.digest) { return }
        let isManifest = MediaType.manifests.contains(descriptor.mediaType) || MediaType.indexes.contains(descriptor.mediaType)
        let url = "\(base)/\(isManifest ? "manifests" : "blobs")/\(descriptor.digest)"
        let response = try await get(url, accept: isManifest ? Self.acceptedManifests : [], what: "\(what) of \(displayName)")
        let writer = try BlobWriter(store: store, what: "\(what) of \(displayName)")
        try await Self.collect(response, what: "\(what) of \(displayName)", limit: descriptor.size) { chunk throws(SwiftletError) in
            try chunk.withBytes { raw throws(SwiftletError) in try writer.write(raw) }
        }
        try writer.commit(expected: descriptor.digest, size: descriptor.size)
    }

    // MARK: HTTP

    /// GET with the current token, answering an auth challenge and following redirects (without
    /// the Authorization header once the host changes). Fails on any status but 200.
    func get(_ url: String, accept: [String], what: String) async throws(SwiftletError) -> HTTPClientResponse {
        var url = url
        var redirects = 0
        while true {
            let response = try await send("GET", url, expecting: [200, 301, 302, 303, 307, 308], accept: accept, what: what,
                                          refusal: ("to \(reference.repository)", "if the image is private, set SWIFTLET_REGISTRY_USER and SWIFTLET_REGISTRY_PASSWORD"))
            if response.status.code == 200 { return response }
            redirects += 1
            guard redirects <= 5, let location = response.headers.first(name: "location") else {
                throw SwiftletError(.invalidFormat, "the registry \(reference.registry) redirected \(what) too often or nowhere")
            }
            let next = Self.resolve(location, against: url)
            guard ["http", "https"].contains(Self.scheme(of: next)) else {
                throw SwiftletError(.invalidFormat, "the registry \(reference.registry) redirected \(what) to \(next.prefix(200)), which is not an http or https URL")
            }
            url = next
        }
    }

    /// One request, with the current token when it goes to the registry's own origin (answering
    /// one auth challenge from there); returns the response when its status is one of
    /// `expecting`, else throws what the status means (`refusal`: what access was refused to,
    /// and what to do about it).
    func send(_ method: String, _ url: String, expecting: Set<UInt>, accept: [String] = [], headers: [(String, String)] = [],
              what: String, refusal: (target: String, hint: String), body: RequestBody? = nil) async throws(SwiftletError) -> HTTPClientResponse {
        var challenged = false
        while true {
            var request = HTTPClientRequest(url: url)
            request.method = .init(rawValue: method)
            if !accept.isEmpty { request.headers.add(name: "Accept", value: accept.joined(separator: ", ")) }
            request.headers.add(name: "User-Agent", value: "swiftlet")
            for (name, value) in headers { request.headers.add(name: name, value: value) }
            if mayAuthorize(url), let token = lock.withLock({ $0 }) { request.headers.add(name: "Authorization", value: token) }
            switch body {
            case .bytes(let bytes)?: request.body = .bytes(ByteBuffer(bytes: bytes))
            case .file(let path, let size)?: request.body = .stream(try FileChunks(path: path, size: size), length: .known(size))
            case nil: break
            }
            let response: HTTPClientResponse
            do {
                response = try await client.execute(request, timeout: timeout)
            } catch {
                throw SwiftletError(.systemCall, "cannot reach the registry \(reference.registry) (\(scheme)) for \(what): \(Self.describe(error))\(scheme == "https" ? "; for a plain-HTTP registry pass --insecure-registry" : "")")
            }
            let code = response.status.code
            if expecting.contains(code) { return response }
            switch code {
            case 401 where mayAuthorize(url) && !challenged:
                challenged = true
                try await authenticate(challenge: response.headers.first(name: "www-authenticate") ?? "", what: what)
            case 401, 403:
                let who = credentials == nil ? "anonymous access" : "the credentials given"
                throw SwiftletError(.permissionDenied, "the registry \(reference.registry) refused \(who) \(refusal.target) (HTTP \(code)); \(refusal.hint)")
            case 404:
                throw SwiftletError(.notFound, "\(what): not found in the registry \(reference.registry) (HTTP 404): check the name and tag")
            default:
                var text: [UInt8] = []
                try? await Self.collect(response, what: what, limit: 4096, truncate: true) { text += $0 }
                throw SwiftletError(.systemCall, "the registry \(reference.registry) answered HTTP \(code) for \(what): \(String(decoding: text.prefix(300), as: UTF8.self))")
            }
        }
    }

    /// Answers a `WWW-Authenticate` challenge: fetches a bearer token from the realm it names, or
    /// uses HTTP basic auth when that is what the registry asks for.
    func authenticate(challenge: String, what: String) async throws(SwiftletError) {
        let (scheme, parameters) = Self.parseChallenge(challenge)
        switch scheme.lowercased() {
        case "basic":
            guard let credentials else {
                throw SwiftletError(.permissionDenied, "the registry \(reference.registry) requires a user name and password for \(what): set SWIFTLET_REGISTRY_USER and SWIFTLET_REGISTRY_PASSWORD")
            }
            lock.withLock { $0 = "Basic " + Self.base64("\(credentials.user):\(credentials.password)") }
        case "bearer":
            guard let realm = parameters["realm"], ["http", "https"].contains(Self.scheme(of: realm)), !Self.host(of: realm).isEmpty else {
                throw SwiftletError(.invalidFormat, "the registry \(reference.registry) sent a bearer challenge without an http or https realm: \(challenge)")
            }
            let sendCredentials = credentials != nil && realmMayReceiveCredentials(realm)
            var query: [String] = []
            if let service = parameters["service"] { query.append("service=" + Self.percentEncode(service)) }
            query.append("scope=" + Self.percentEncode(parameters["scope"] ?? "repository:\(reference.repository):pull"))
            var request = HTTPClientRequest(url: realm + (realm.contains("?") ? "&" : "?") + query.joined(separator: "&"))
            if sendCredentials, let credentials {
                request.headers.add(name: "Authorization", value: "Basic " + Self.base64("\(credentials.user):\(credentials.password)"))
            }
            let response: HTTPClientResponse
            do { response = try await client.execute(request, timeout: timeout) } catch {
                throw SwiftletError(.systemCall, "cannot reach the token service \(realm) of \(reference.registry): \(Self.describe(error))")
            }
            guard response.status.code == 200 else {
                let withheld = credentials != nil && !sendCredentials
                    ? "; the credentials given were not sent to it: Swiftlet sends them to a token service only over HTTPS from an HTTPS registry, or to the registry itself" : ""
                throw SwiftletError(.permissionDenied, "the token service \(realm) of \(reference.registry) refused a token for \(reference.repository) (HTTP \(response.status.code))\(withheld)")
            }
            var body: [UInt8] = []
            try await Self.collect(response, what: "a token from \(realm)", limit: 1 << 20) { body += $0 }
            struct TokenReply: Decodable { var token: String?; var access_token: String? }
            let reply = try decodeDocument(TokenReply.self, from: body, what: "the token service's reply")
            guard let token = reply.token ?? reply.access_token, !token.isEmpty else {
                throw SwiftletError(.invalidFormat, "the token service \(realm) of \(reference.registry) sent no token")
            }
            lock.withLock { $0 = "Bearer " + token }
        default:
            throw SwiftletError(.unsupported, "the registry \(reference.registry) asks for authentication Swiftlet does not speak: \(challenge.isEmpty ? "(no challenge)" : challenge)")
        }
    }

    /// Streams a response body to `sink`, failing when it exceeds `limit` bytes (unless `truncate`).
    static func collect(_ response: HTTPClientResponse, what: String, limit: Int64, truncate: Bool = false,
                                _ sink: ([UInt8]) throws(SwiftletError) -> Void) async throws(SwiftletError) {
        var total: Int64 = 0
        do {
            for try await buffer in response.body {
                let chunk = Array(buffer.readableBytesView)
                total += Int64(chunk.count)
                if total > limit {
                    if truncate { return }
                    throw SwiftletError(.invalidFormat, "\(what) is larger than its declared \(limit) bytes")
                }
                try sink(chunk)
            }
        } catch let error as SwiftletError {
            throw error
        } catch {
            throw SwiftletError(.systemCall, "the transfer of \(what) failed: \(describe(error))")
        }
    }

    static func describe(_ error: any Error) -> String {
        let text = String(describing: error)
        if text.contains("connectionRefused") || text.contains("Connection refused") { return "connection refused (is the registry running?)" }
        if text.contains("connectTimeout") || text.contains("deadlineExceeded") { return "timed out" }
        return text
    }

    /// `Bearer realm="https://auth",service="registry",scope="repository:x:pull"` → ("Bearer", [...]).
    static func parseChallenge(_ header: String) -> (String, [String: String]) {
        let trimmed = header.trimmingSpaces
        guard let space = trimmed.firstIndex(of: " ") else { return (trimmed, [:]) }
        let scheme = String(trimmed[..<space])
        var parameters: [String: String] = [:]
        var rest = Substring(trimmed[trimmed.index(after: space)...])
        while !rest.isEmpty {
            rest = rest.drop(while: { $0 == " " || $0 == "," })
            guard let equals = rest.firstIndex(of: "=") else { break }
            let key = String(rest[..<equals]).trimmingSpaces.lowercased()
            rest = rest[rest.index(after: equals)...]
            var value = ""
            if rest.first == "\"" {
                rest = rest.dropFirst()
                while let c = rest.first, c != "\"" {
                    if c == "\\", let next = rest.dropFirst().first { value.append(next); rest = rest.dropFirst(2); continue }
                    value.append(c); rest = rest.dropFirst()
                }
                rest = rest.dropFirst()
            } else {
                let end = rest.firstIndex(of: ",") ?? rest.endIndex
                value = String(rest[..<end]).trimmingSpaces
                rest = rest[end...]
            }
            parameters[key] = value
        }
        return (scheme, parameters)
    }

    /// Whether a request to `url` may carry the registry's credentials or token: only to the
    /// registry's own origin, the host and port the user named over the scheme chosen for it (so
    /// not after a redirect to another host or from HTTPS to HTTP).
    func mayAuthorize(_ url: String) -> Bool {
        Self.scheme(of: url) == scheme && Self.host(of: url).lowercased() == reference.apiHost.lowercased()
    }

    /// Whether the user's password may go to the token service at `realm`, which the registry
    /// named: over HTTPS when the registry itself is HTTPS (the registry, authenticated by TLS,
    /// vouches for its token service, as Docker trusts it), or to the registry's own origin. Never
    /// over plain HTTP to another host, and never to any other host from a plain-HTTP registry,
    /// whose challenge anyone on the path could have written.
    func realmMayReceiveCredentials(_ realm: String) -> Bool {
        if mayAuthorize(realm) { return true }
        return scheme == "https" && Self.scheme(of: realm) == "https"
    }

    /// The scheme of `url`, lowercased ("" if it has none).
    static func scheme(of url: String) -> String {
        guard let end = url.firstRange(of: "://")?.lowerBound else { return "" }
        return url[..<end].lowercased()
    }

    static func host(of url: String) -> String {
        guard let start = url.firstRange(of: "://")?.upperBound else { return "" }
        let rest = url[start...]
        return String(rest[..<(rest.firstIndex(of: "/") ?? rest.endIndex)])
    }

    static func resolve(_ location: String, against url: String) -> String {
        // Absolute when a scheme comes first ("?next=http://x" in a relative one does not count).
        if let marker = location.firstRange(of: "://"), location[..<marker.lowerBound].allSatisfy({ $0.isLetter || $0.isNumber || "+-.".contains($0) }) {
            return location
        }
        guard let start = url.firstRange(of: "://")?.upperBound else { return location }
        let hostEnd = url[start...].firstIndex(of: "/") ?? url.endIndex
        return String(url[..<hostEnd]) + (location.hasPrefix("/") ? location : "/" + location)
    }

    static func percentEncode(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(Character(Unicode.Scalar(byte)))
            default:
                let digits = Array("0123456789ABCDEF")
                out += "%" + String(digits[Int(byte >> 4)]) + String(digits[Int(byte & 15)])
            }
        }
        return out
    }

    static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
}
