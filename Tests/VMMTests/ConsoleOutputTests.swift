import Glibc
import SwiftletSystem
import Testing
import TestSupport
@testable import VMM

@Suite struct ConsoleOutputTests {
    @Test func aConsoleFileStaysUnderItsLimitAndEndsWithTheNewestOutput() throws {
        let dir = TemporaryDirectory()
        let path = dir.write("console.log", Array("written before the machine\n".utf8))
        let file = try OwnedFileDescriptor.open(path, flags: O_WRONLY | O_APPEND)
        let limit: UInt64 = 4096
        let console = ConsoleOutput(fd: file.rawValue, fileLimit: limit)
        for i in 0..<5000 { for byte in "line \(i)\n".utf8 { console.write(byte) } }
        console.flush()
        let text = String(decoding: try OwnedFileDescriptor.readSmallFile(path), as: UTF8.self)
        let before = "written before the machine\n"
        // What was in the file stays; the console's own part keeps under the limit.
        #expect(text.hasPrefix(before))
        #expect(UInt64(text.utf8.count - before.utf8.count) <= limit)
        #expect(text.dropFirst(before.count).hasPrefix("[swiftlet: the console passed 4096 bytes; earlier output was dropped]\n"))
        #expect(text.hasSuffix("line 4998\nline 4999\n"))
    }

    @Test func pipesAreNotLimited() throws {
        var ends: [Int32] = [0, 0]
        #expect(closeOnExecPipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let console = ConsoleOutput(fd: ends[1], fileLimit: 64)
        for byte in Array(String(repeating: "x", count: 199).utf8) + [UInt8(ascii: "\n")] { console.write(byte) }
        var buffer = [UInt8](repeating: 0, count: 512)
        #expect(read(ends[0], &buffer, 512) == 200)
    }
}
