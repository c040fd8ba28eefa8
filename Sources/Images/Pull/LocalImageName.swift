/// The name an image from an OCI layout or archive is recorded under, so that `image ls` shows it
/// and `run --image NAME` finds it in the store.
enum LocalImageName {
    static let refNameKey = "org.opencontainers.image.ref.name"
    static let containerdNameKey = "io.containerd.image.name"

    /// The name of the image that the entries of `index` (those a `DIR:TAG` left) hold, when they
    /// agree on one:
    /// - containerd's `io.containerd.image.name` (a full reference, as `docker save` writes it);
    /// - else the ref name, when it is a reference (`app:1`, `team/app`, `example.com/app:1`); one
    ///   that states no registry goes under `localhost/`, as podman does, so that a local image
    ///   never passes for Docker Hub's;
    /// - a ref name that is a single word (`latest`, `py`) names the image only when the user picked
    ///   it as the TAG (`localhost/py:latest`, as podman's `oci:DIR:py`): skopeo's `oci:DIR:TAG`
    ///   writes bare tags there, and `latest` alone is no name.
    /// nil when the entries hold no name, disagree, or the name is not a valid image reference.
    static func name(of index: ImageIndex, tag: String?) -> String? {
        let names = index.manifests.map { entry(name: $0, tag: tag) }
        guard let first = names.first, names.allSatisfy({ $0 == first }) else { return nil }
        return first
    }

    private static func entry(name descriptor: Descriptor, tag: String?) -> String? {
        let annotations = descriptor.annotations ?? [:]
        if let full = annotations[containerdNameKey] { return (try? ImageReference(parsing: full))?.description }
        guard let refName = annotations[refNameKey] else { return nil }
        guard refName.contains("/") || refName.contains(":") || refName == tag else { return nil }
        return (try? ImageReference(parsing: refName, defaultRegistry: "localhost"))?.description
    }
}
