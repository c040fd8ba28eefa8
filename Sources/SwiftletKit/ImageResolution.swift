import Glibc
import Images
import Synchronization
import SwiftletSystem

/// What `--image` names, resolved to an image in the store with its layer disks ready.
public struct ResolvedImage: Sendable {
    public var image: StoredImage
    public var configuration: ImageConfiguration
    /// Read-only layer disks, bottom first.
    public var disks: [String]
}

/// How `swiftlet run --image` and `swiftlet image pull` find an image: a registry reference (the
/// store first, then the registry), an OCI layout directory, an image archive, or `-` (an archive
/// on standard input). `path:TAG` picks one image from a directory or archive holding several.
public struct ImageResolver: Sendable {
    public var store: ImageStore
    public var insecure = false
    public var policy = PullPolicy.missing
    /// A signalfd whose signals (Ctrl-C) abandon a pull in progress: the process exits 128+N.
    public var interruptions: Int32? = nil
    /// Progress lines (layers fetched, disks made).
    public var progress: @Sendable (String) -> Void = { _ in }

    public init(store: ImageStore, insecure: Bool = false, policy: PullPolicy = .missing, interruptions: Int32? = nil,
                progress: @escaping @Sendable (String) -> Void = { _ in }) {
        self.store = store; self.insecure = insecure; self.policy = policy; self.interruptions = interruptions; self.progress = progress
    }

    public func resolve(_ text: String) throws(SwiftletError) -> ResolvedImage {
        let image: StoredImage
        if text.hasPrefix("sha256:") {
            guard let stored = try store.find(text) else {
                throw SwiftletError(.notFound, "no image \(text) in the image store (see `swiftlet image ls`)")
            }
            image = stored
        } else if let local = try localSource(text) {
            image = try pull(local)
        } else {
            let reference = try ImageReference(parsing: text)
            if policy != .always, let stored = try store.find(reference.description) {
                image = stored
            } else if policy == .never {
                throw SwiftletError(.notFound, "no image \(reference) in the image store, and --pull never: pull it first")
            } else {
                image = try RegistryPull(reference: reference, insecure: insecure, progress: progress, interruptions: interruptions).run(store: store)
            }
        }
        return try prepare(image)
    }

    /// Loads the config and makes sure every layer has its disk (converting any that is missing).
    func prepare(_ image: StoredImage) throws(SwiftletError) -> ResolvedImage {
        let config = try ImageConfiguration.decode(try store.readBlob(image.config, what: "image config"))
        let disks = try store.disks(for: image, progress: progress)
        return ResolvedImage(image: image, configuration: config, disks: disks)
    }

    /// An image source on this machine, if `text` names one (`-`, a directory, a file, `path:TAG`).
    func localSource(_ text: String) throws(SwiftletError) -> (any ImageSource)? {
        if text == "-" {
            return try ArchiveSource(reading: 0, displayName: "standard input", into: store)
        }
        var path = text, tag: String?
        if access(path, F_OK) != 0, let colon = text.lastIndex(of: ":"), access(String(text[..<colon]), F_OK) == 0 {
            path = String(text[..<colon])
            tag = String(text[text.index(after: colon)...])
        }
        let pathLike = text.hasPrefix("/") || text.hasPrefix("./") || text.hasPrefix("../")
        guard access(path, F_OK) == 0 else {
            if pathLike { throw SwiftletError(.notFound, "no image at \(text): no such file or directory") }
            return nil
        }
        var info = stat()
        stat(path, &info)
        if (info.st_mode & S_IFMT) == S_IFDIR {
            // A directory that is not a layout is a registry name (`library/busybox`), unless written as a path.
            guard pathLike || access(path + "/oci-layout", F_OK) == 0 else { return nil }
            return try OCILayoutSource(directory: path, tag: tag)
        }
        let file = try OwnedFileDescriptor.openInput(path, role: "image archive")
        return try ArchiveSource(reading: file.rawValue, displayName: path, tag: tag, into: store)
    }

    func pull(_ source: any ImageSource) throws(SwiftletError) -> StoredImage {
        let puller = ImagePuller(progress: progress)
        let store = store
        return try blockingAsync(interruptions: interruptions) { () async throws(SwiftletError) in try await puller.pull(from: source, into: store) }
    }

}

/// Runs async work from synchronous code (the CLI's commands are synchronous: their VMs run on
/// threads of their own) and waits for it. A signal read from `interruptions` (a signalfd)
/// cancels the work and throws `.interrupted` at once: what was half-fetched stays in the
/// store's tmp/, never as content. It blocks its thread until the work, which runs on Swift's
/// cooperative pool, is done: call it from a thread of its own (the CLI's main thread, a machine
/// thread), never from a task on that pool, whose few threads it could starve.
func blockingAsync<T: Sendable>(interruptions: Int32? = nil, _ body: @escaping @Sendable () async throws(SwiftletError) -> T) throws(SwiftletError) -> T {
    let pending = try PendingResult<T>()
    let task = Task {
        do throws(SwiftletError) { pending.set(.success(try await body())) } catch { pending.set(.failure(error)) }
    }
    while pending.result == nil {
        let ready = try Poll.wait([pending.ended, interruptions ?? -1])
        if ready[1], let interruptions {
            try throwIfInterrupted(interruptions) { task.cancel() }
        }
    }
    return try pending.wait().get()
}
