import Glibc
import SystemPackage
import Testing
import SwiftletSystem

@Suite struct DirectoriesTests {
    /// A fresh directory under /tmp.
    func scratch() -> String {
        var template = Array("/tmp/swiftlet-dirs.XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: made!)
    }

    func remove(_ path: String) {
        for (name, isDirectory) in OwnedFileDescriptor.directoryEntries(path) ?? [] {
            if isDirectory { remove(path + "/" + name) } else { unlink(path + "/" + name) }
        }
        rmdir(path)
    }

    func mode(_ path: String) -> mode_t? {
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else { return nil }
        return info.st_mode & 0o777
    }

    @Test func missingParentsAreCreatedWithTheMode() throws {
        let base = scratch()
        defer { remove(base) }
        try makeDirectories(base + "/home/.local/share/swiftlet", mode: 0o700)
        for path in ["/home", "/home/.local", "/home/.local/share", "/home/.local/share/swiftlet"] {
            #expect(mode(base + path) == 0o700, "\(path) is a directory with mode 0700")
        }
        // Existing directories, doubled and trailing slashes, and `..`.
        try makeDirectories(base + "//home/.local//share/swiftlet/")
        try makeDirectories(base + "/home/.local/../other/child")
        #expect(mode(base + "/home/other/child") != nil)
    }

    @Test func aFileInTheWayIsNamed() throws {
        let base = scratch()
        defer { remove(base) }
        let file = base + "/file"
        let fd = open(file, O_WRONLY | O_CREAT, 0o644)
        #expect(fd >= 0)
        close(fd)
        #expect { try makeDirectories(file + "/a/b") } throws: {
            let error = $0 as! SwiftletError
            return error.message == "cannot create \(file)/a/b: \(file) exists and is not a directory" && error.cause == .notDirectory
        }
        #expect { try makeDirectories(file) } throws: {
            ($0 as! SwiftletError).message == "cannot create \(file): \(file) exists and is not a directory"
        }
        #expect(mode(file + "/a") == nil)
    }

    @Test func anEmptyPathIsRefused() {
        #expect { try makeDirectories("") } throws: {
            let error = $0 as! SwiftletError
            return error.code == .invalidArgument && error.message == "cannot create a directory with an empty path"
        }
    }
}
