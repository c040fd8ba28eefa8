import Glibc
import SystemPackage
import Testing
@testable import SwiftletSystem

/// Files Swiftlet writes are the user's alone, and files it opens for outside input or writes
/// into place never follow a symbolic link someone planted.
@Suite struct PrivateFileTests {
    /// A fresh directory, removed with what is in it afterwards.
    private func withDirectory(_ body: (String) throws -> Void) throws {
        var template = Array("/tmp/swiftlet-private.XXXXXX".utf8CString)
        let made = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
        let directory = String(cString: made)
        defer { try? FileTree.remove(directory) }
        try body(directory)
    }

    private func mode(_ path: String) -> mode_t {
        var info = stat()
        return lstat(path, &info) == 0 ? info.st_mode & 0o7777 : 0
    }

    private func contents(_ path: String) -> String {
        (try? OwnedFileDescriptor.readSmallTextFile(path)) ?? "<unreadable>"
    }

    private func write(_ text: String, to path: String) throws {
        let file = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        try file.write(Array(text.utf8), at: 0, what: path)
    }

    /// A planted symbolic link, at the target or at any name beside it, is never written through:
    /// the new file replaces the link, private, and the file the link pointed at is untouched.
    @Test func writingIntoPlaceNeverFollowsAPlantedLink() throws {
        try withDirectory { directory in
            let victim = directory + "/victim"
            try write("precious", to: victim)
            let target = directory + "/copied"
            // The names the old `machine cp` used, and the target itself.
            #expect(symlink(victim, target + ".swiftlet-cp") == 0)
            #expect(symlink(victim, target) == 0)
            try OwnedFileDescriptor.writeIntoPlace(target) { file throws(SwiftletError) in try file.write(Array("new".utf8), at: 0, what: "copy") }
            #expect(contents(victim) == "precious")
            var info = stat()
            #expect(lstat(target, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG)
            #expect(contents(target) == "new")
            #expect(mode(target) == 0o600)
            // Only the planted link and the two files are left (no temporary file).
            #expect(Set((OwnedFileDescriptor.directoryEntries(directory) ?? []).map(\.name)) == ["victim", "copied", "copied.swiftlet-cp"])
        }
    }

    @Test func aWriteThatFailsLeavesTheTargetAsItWas() throws {
        try withDirectory { directory in
            let target = directory + "/kept"
            try write("old", to: target)
            #expect(throws: SwiftletError.self) {
                try OwnedFileDescriptor.writeIntoPlace(target) { file throws(SwiftletError) in
                    try file.write(Array("partial".utf8), at: 0, what: "copy")
                    throw SwiftletError(.guestFailure, "the copy failed")
                }
            }
            #expect(contents(target) == "old")
            #expect((OwnedFileDescriptor.directoryEntries(directory) ?? []).map(\.name) == ["kept"])
        }
    }

    @Test func openingARegularFileRefusesLinksDevicesAndFIFOs() throws {
        try withDirectory { directory in
            let file = directory + "/file"
            try write("data", to: file)
            #expect(try OwnedFileDescriptor.openRegularFile(file, flags: O_RDONLY, what: "disk").size() == 4)
            #expect(symlink(file, directory + "/link") == 0)
            #expect(symlink("/dev/null", directory + "/device") == 0)
            #expect(mkfifo(directory + "/fifo", 0o600) == 0)
            let refusals = [
                ("/link", "is a symbolic link, which is refused"),
                ("/device", "is a symbolic link, which is refused"),
                ("/fifo", "is not a regular file"),
                ("", "is not a regular file"),
            ]
            for (name, message) in refusals {
                let error = #expect(throws: SwiftletError.self) {
                    _ = try OwnedFileDescriptor.openRegularFile(directory + name, flags: O_RDONLY, what: "disk")
                }
                #expect(error?.message.contains(message) == true, "\(name): \(String(describing: error))")
            }
            let device = #expect(throws: SwiftletError.self) { _ = try OwnedFileDescriptor.openRegularFile("/dev/null", flags: O_RDWR, what: "disk") }
            #expect(device?.message == "disk /dev/null is not a regular file (a device, FIFO, socket or directory), which is refused")
        }
    }

    @Test func smallFilesDirectoriesAndSocketsArePrivate() throws {
        try withDirectory { directory in
            // (Under the usual umask 022, what Swiftlet used to ask for shows as 0644 and 0755.)
            try OwnedFileDescriptor.writeSmallFileAtomically(directory + "/record", Array("{}".utf8))
            #expect(mode(directory + "/record") == 0o600)
            try makeDirectories(directory + "/home/machines", mode: 0o700)
            #expect(mode(directory + "/home") == 0o700 && mode(directory + "/home/machines") == 0o700)
            let socket = try UnixSocket.listen(at: directory + "/control.sock")
            #expect(mode(directory + "/control.sock") == 0o600)
            withExtendedLifetime(socket) {}
        }
    }
}
