import Glibc

/// A fresh directory under $TMPDIR, removed with its contents when the value is released.
public final class TemporaryDirectory: @unchecked Sendable {
    public let path: String

    public init() {
        var template = Array(((getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp") + "/swiftlet-test.XXXXXX").utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }

    deinit {
        _ = Subprocess.run(["/bin/rm", "-rf", path])
    }

    /// Writes `bytes` to `name` inside the directory and returns its path.
    @discardableResult
    public func write(_ name: String, _ bytes: [UInt8], mode: mode_t = 0o644) -> String {
        let file = path + "/" + name
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, mode)
        precondition(fd >= 0, "cannot create \(file)")
        bytes.withUnsafeBytes { b in
            var done = 0
            while done < b.count { done += Glibc.write(fd, b.baseAddress! + done, b.count - done) }
        }
        close(fd)
        return file
    }

    /// Creates a sparse file of `size` bytes.
    @discardableResult
    public func sparse(_ name: String, size: Int) -> String {
        let file = path + "/" + name
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        ftruncate(fd, off_t(size))
        close(fd)
        return file
    }
}
