import Glibc
import Images
import Synchronization
import SwiftletSystem

/// What `--image` names, resolved to an image in the store with its layer disks ready.
struct ResolvedImage {
    var image: StoredImage
    var configuration: ImageConfiguration
    /// Read-only layer disks, bottom first.
    var disks: [String]
}

/// How `swiftlet run --image` and `swiftlet image pull` find an image: a registry reference (the
/// store first, then the registry), an OCI layout directory, an image archive, or `-` (an archive
/// on standard input). `path:TAG` picks one image from a directory or archive holding several.
struct ImageResolver {
    var store: ImageStore
    var insecure = false
    var policy = PullPolicy.missing
    var quiet = false
    /// A signalfd whose signals (Ctrl-C) abandon a pull in progress: the process exits 128+N.
    var interruptions: Int32? = nil

    func resolve(_ text: String) throws(SwiftletError) -> ResolvedImage {
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
                image = try RegistryPull(reference: reference, insecure: insecure, quiet: quiet, interruptions: interruptions).run(store: store)
            }
        }
        return try prepare(image)
    }

    /// Loads the config and makes sure every layer has its disk (converting any that is missing).
    func prepare(_ image: StoredImage) throws(SwiftletError) -> ResolvedImage {
        let config = try ImageConfiguration.decode(try store.readBlob(image.config, what: "image config"))
        let quiet = quiet
        let disks = try store.disks(for: image, progress: { line in if !quiet { printError(line) } })
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
        let quiet = quiet
        let puller = ImagePuller(progress: { line in if !quiet { printError(line) } })
        let store = store
        return try blockingAsync(interruptions: interruptions) { () async throws(SwiftletError) in try await puller.pull(from: source, into: store) }
    }

}

/// Runs async work from synchronous code (the CLI's commands are synchronous: their VMs run on
/// threads of their own) and waits for it. A signal read from `interruptions` (a signalfd) ends
/// the process with 128+N: what was half-fetched stays in the store's tmp/, never as content.
func blockingAsync<T: Sendable>(interruptions: Int32? = nil, _ body: @escaping @Sendable () async throws(SwiftletError) -> T) throws(SwiftletError) -> T {
    let box = ResultBox<T>()
    let finished = try EventFD(nonBlocking: false)
    let fd = finished.rawValue
    Task {
        let outcome: Result<T, SwiftletError>
        do throws(SwiftletError) { outcome = .success(try await body()) } catch { outcome = .failure(error) }
        box.result.withLock { $0 = outcome }
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }
    var waits = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
    if let interruptions { waits.append(pollfd(fd: interruptions, events: Int16(POLLIN), revents: 0)) }
    while true {
        if poll(&waits, nfds_t(waits.count), -1) < 0 { continue }
        if waits[0].revents != 0 { break }
        if waits.count > 1, waits[1].revents != 0 { exitIfInterrupted(waits[1].fd) }
    }
    return try box.result.withLock { $0 }!.get()
}

private final class ResultBox<T: Sendable>: Sendable {
    let result = Mutex<Result<T, SwiftletError>?>(nil)
}
