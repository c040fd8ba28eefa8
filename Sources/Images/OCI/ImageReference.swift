import SwiftletSystem

/// A registry image reference: `[registry[:port]/]repository[:tag][@sha256:digest]`, with Docker's
/// defaults (`alpine` is `docker.io/library/alpine:latest`).
public struct ImageReference: Sendable, Equatable, CustomStringConvertible {
    /// The registry as written (`docker.io`, `localhost:5000`).
    public var registry: String
    public var repository: String
    public var tag: String?
    public var digest: Digest?

    public static let defaultRegistry = "docker.io"

    /// Parses `text`; a name that states no registry is `defaultRegistry`'s (Docker Hub's unless
    /// told: local images go under `localhost`).
    public init(parsing text: String, defaultRegistry: String = ImageReference.defaultRegistry) throws(SwiftletError) {
        func invalid(_ why: String) -> SwiftletError {
            SwiftletError(.invalidArgument, "invalid image reference \(text.debugDescription): \(why)")
        }
        var rest = Substring(text)
        if let at = rest.firstIndex(of: "@") {
            digest = try Digest(parsing: String(rest[rest.index(after: at)...]))
            rest = rest[..<at]
        }
        // A tag is a colon after the last slash (a colon before it is a registry port).
        if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") {
            let candidate = String(rest[rest.index(after: colon)...])
            guard !candidate.isEmpty, candidate.utf8.count <= 128,
                  candidate.utf8.allSatisfy({ Self.isAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }),
                  candidate.first != ".", candidate.first != "-"
            else { throw invalid("bad tag \(candidate.debugDescription)") }
            tag = candidate
            rest = rest[..<colon]
        }
        var components = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard let first = components.first, !first.isEmpty else { throw invalid("no repository name") }
        if components.count > 1, first.contains(".") || first.contains(":") || first == "localhost" {
            registry = first
            components.removeFirst()
        } else {
            registry = defaultRegistry
        }
        if registry == Self.defaultRegistry, components.count == 1 { components.insert("library", at: 0) }
        for component in components {
            guard !component.isEmpty,
                  component.utf8.allSatisfy({ Self.isLowerAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }),
                  let firstByte = component.utf8.first, Self.isLowerAlphanumeric(firstByte)
            else { throw invalid("repository names are lowercase letters, digits and . _ - separated by /") }
        }
        repository = components.joined(separator: "/")
        if tag == nil && digest == nil { tag = "latest" }
    }

    /// The host the distribution API is served from (Docker Hub's differs from its name).
    public var apiHost: String { registry == Self.defaultRegistry ? "registry-1.docker.io" : registry }

    /// The tag or digest to ask the registry for; a digest wins.
    public var manifestReference: String { digest?.description ?? tag ?? "latest" }

    /// The fully qualified name, as the store keeps it.
    public var description: String {
        var text = "\(registry)/\(repository)"
        if let tag { text += ":" + tag }
        if let digest { text += "@" + digest.description }
        return text
    }

    /// Whether plain HTTP is the default for this registry: loopback only, as Docker does.
    public var isLoopback: Bool {
        let host = registry.split(separator: ":").first.map(String.init) ?? registry
        return host == "localhost" || host.hasPrefix("127.") || registry.hasPrefix("[::1]")
    }

    private static func isLowerAlphanumeric(_ byte: UInt8) -> Bool {
        (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
    }

    private static func isAlphanumeric(_ byte: UInt8) -> Bool {
        isLowerAlphanumeric(byte) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
    }
}
