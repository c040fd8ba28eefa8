import Glibc
import SwiftletSystem
import SwiftletKit
@testable import Images

/// A scratch directory for the targets that need files: in /dev/shm when there is one (the code
/// under test fsyncs what it writes, which a disk makes slow), else in TMPDIR; removed at exit.
enum Scratch {
    static let directory: String = {
        let parent = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        var template = Array((parent + "/swiftlet-fuzz.XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { fatalError("cannot create a scratch directory") }
        atexit { try? FileTree.remove(Scratch.directory) }
        return String(cString: made)
    }()

    /// Writes `bytes` to `name` in the scratch directory and returns its path.
    static func write(_ bytes: [UInt8], to name: String) -> String {
        let path = directory + "/" + name
        unlink(path)
        try! OwnedFileDescriptor.writeSmallFileAtomically(path, bytes)
        return path
    }
}

/// A layer tar becomes an EROFS image. The input is the (uncompressed) tar. Every accepted layer
/// must make an image `fsck.erofs` passes: checked for every 32nd accepted input, or every one
/// with SWIFTLET_FUZZ_FSCK=1 (fsck costs a process per input).
enum TarEROFSFuzz {
    nonisolated(unsafe) static var accepted = 0
    static let fsckEvery: Int = getenv("SWIFTLET_FUZZ_FSCK").map { String(cString: $0) == "1" ? 1 : 32 } ?? 32
    static let fsck: String? = ["/usr/bin/fsck.erofs", "/usr/sbin/fsck.erofs"].first { access($0, X_OK) == 0 }

    static func run(_ bytes: [UInt8]) {
        let image = Scratch.directory + "/layer.erofs"
        unlink(image)
        var offset = 0
        do {
            try LayerConverter.convert(scratchDirectory: Scratch.directory, to: image) { buffer throws(SwiftletError) in
                let n = min(buffer.count, bytes.count - offset)
                bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + n])) }
                offset += n
                return n
            }
        } catch {
            return
        }
        accepted += 1
        if accepted % fsckEvery == 0, let fsck {
            let pid = try! spawnChild(fsck, arguments: [fsck, image], output: .null, error: .null, what: "fsck.erofs")
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            precondition(status == 0, "fsck.erofs rejects the image an accepted layer became (status \(status))")
        }
    }

    /// Real archives made by tar(1): files, directories, a symlink, a hard link, a long name (PAX),
    /// a whiteout.
    static func seeds() -> [[UInt8]] {
        let directory = Scratch.directory + "/seed"
        let script = """
            set -e; rm -rf '\(directory)'; mkdir -p '\(directory)/root/etc' '\(directory)/root/bin' '\(directory)/root/usr/share/long-directory-name-to-need-pax-records-in-the-tar-header-because-it-is-longer-than-one-hundred-bytes'
            cd '\(directory)/root'; echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd; printf 'x%.0s' $(seq 1 5000) > bin/big
            ln -s ../etc/passwd bin/link; ln etc/passwd etc/hard; touch usr/share/long-directory-name-to-need-pax-records-in-the-tar-header-because-it-is-longer-than-one-hundred-bytes/f
            touch etc/.wh.removed; chmod 4755 bin/big
            tar --format=pax --owner=0 --group=0 --mtime=@0 -cf ../pax.tar .; tar --format=gnu --owner=0 --group=0 --mtime=@0 -cf ../gnu.tar etc bin
            """
        let pid = try! spawnChild("/bin/sh", arguments: ["/bin/sh", "-c", script], output: .null, error: .null, what: "tar")
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        precondition(status == 0, "cannot make the seed tars")
        return ["pax.tar", "gnu.tar"].map { try! OwnedFileDescriptor.readSmallFile(directory + "/" + $0, limit: 1 << 20) }
    }
}

/// Image documents as a registry or a layout hands them over: the input is up to three JSON
/// documents separated by NUL bytes (an index, a manifest, a config). Each is typed and decoded
/// as the pull does; an index has its manifest chosen for the host platform.
enum OCIDocumentsFuzz {
    struct NoSource: ImageSource {
        var displayName: String { "fuzz" }
        var imageName: String? { nil }
        func root() async throws(SwiftletError) -> (bytes: [UInt8], mediaType: String?) { ([], nil) }
        func fetch(_ descriptor: Descriptor, into store: ImageStore, what: String) async throws(SwiftletError) {}
    }

    static func run(_ bytes: [UInt8]) {
        let documents = bytes.split(separator: 0, maxSplits: 2, omittingEmptySubsequences: false).map(Array.init)
        let puller = ImagePuller()
        for document in documents {
            guard let type = try? ImagePuller.mediaType(of: document, stated: nil, what: "document") else { continue }
            if MediaType.indexes.contains(type), let index = try? decodeDocument(ImageIndex.self, from: document, what: "index") {
                _ = try? puller.choose(from: index, source: NoSource())
                _ = LocalImageName.name(of: index, tag: nil)
            }
            if MediaType.manifests.contains(type), let manifest = try? decodeDocument(ImageManifest.self, from: document, what: "manifest") {
                _ = manifest.layers.map { ImagePuller.formatSize($0.size) }
            }
        }
        if let config = documents.last, let parsed = try? ImageConfiguration.decode(config) {
            _ = parsed.platform.description
        }
    }

    static func seeds() -> [[UInt8]] {
        let config = #"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]}}"#
        let manifest = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9","size":321},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","size":1024}]}"#
        let index = #"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9","size":500,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","size":500,"platform":{"architecture":"unknown","os":"unknown"}}]}"#
        let docker = #"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9","size":321},"layers":[]}"#
        return [Array(index.utf8) + [0] + Array(manifest.utf8) + [0] + Array(config.utf8), Array(manifest.utf8) + [0] + Array(config.utf8),
                Array(docker.utf8), Array(config.utf8)]
    }
}
