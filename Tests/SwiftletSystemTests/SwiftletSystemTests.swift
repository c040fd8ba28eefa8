import CLinux
import Glibc
import SystemPackage
import Testing
@testable import SwiftletSystem

@Suite struct SwiftletSystemTests {
    @Test func errnoMapsToCodes() {
        #expect(SwiftletError.system("x", errno: .noSuchFileOrDirectory).code == .notFound)
        #expect(SwiftletError.system("x", errno: .permissionDenied).code == .permissionDenied)
        #expect(SwiftletError.system("x", errno: .ioError).code == .systemCall)
        #expect(SwiftletError(.invalidArgument, "bad", cause: .invalidArgument).description.hasPrefix("bad ("))
    }

    @Test func openInputExplainsWhatFailed() throws {
        #expect { try OwnedFileDescriptor.openInput("/nonexistent/k", role: "kernel", hint: "build it") } throws: {
            let e = $0 as! SwiftletError
            return e.code == .notFound && e.message.hasPrefix("cannot open kernel /nonexistent/k") && e.message.hasSuffix("; build it")
        }
        #expect { try OwnedFileDescriptor.openInput("/tmp", role: "initrd") } throws: {
            ($0 as! SwiftletError).message == "initrd /tmp is not a regular file"
        }
    }

    @Test func readsFilesAndReportsTruncation() throws {
        let fd = try OwnedFileDescriptor.open("/proc/self/status", flags: O_RDONLY)
        #expect(try fd.read(count: 5, at: 0, what: "status") == Array("Name:".utf8))
        let text = try OwnedFileDescriptor.readSmallTextFile("/proc/self/status")
        #expect(text.contains("VmHWM:"))
        var template = Array("/tmp/swiftlet-fd.XXXXXX".utf8CString)
        let raw = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        defer { template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) } }
        let file = OwnedFileDescriptor(taking: raw)
        try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try file.writeAll($0) }
        #expect(try file.size() == 10)
        #expect { try file.read(count: 20, at: 0, what: "the file") } throws: {
            ($0 as! SwiftletError).message.contains("truncated")
        }
    }

    @Test func anonymousMappingsAreZeroedAndReleased() throws {
        let mapping = try MemoryMapping.anonymous(size: 1 << 20)
        #expect(mapping.buffer.allSatisfy { $0 == 0 })
        mapping.buffer[4096] = 1
        #expect(mapping.residentBytes() >= 4096)
    }

    @Test func alignedMappingsStartOnTheBoundary() throws {
        for _ in 0..<4 {
            let mapping = try MemoryMapping.anonymous(size: 6 << 20, alignment: 2 << 20, transparentHugePages: true)
            #expect(UInt(bitPattern: mapping.base) % (2 << 20) == 0)
            mapping.buffer[(6 << 20) - 1] = 1
        }
    }

    @Test func eventFDCountsSignals() throws {
        let event = try EventFD()
        #expect(event.drain() == 0)
        event.signal(); event.signal()
        #expect(event.drain() == 2)
    }

    @Test func threadsRunAndCanBeInterrupted() throws {
        var blocking: [Int32] = [0, 0], results: [Int32] = [0, 0]
        #expect(swiftlet_pipe(&blocking) == 0 && swiftlet_pipe(&results) == 0)
        let readEnd = blocking[0], resultEnd = results[1]
        // A thread blocked in read(2) returns EINTR when interrupted.
        let thread = try OSThread.start(name: "blocked-reader") {
            var byte: UInt8 = 0
            let n = read(readEnd, &byte, 1)
            var result: UInt8 = n < 0 && errno == EINTR ? 1 : 0
            _ = write(resultEnd, &result, 1)
        }
        // The signal is lost if it lands before the thread blocks: repeat until it reports.
        var poller = pollfd(fd: results[0], events: Int16(POLLIN), revents: 0)
        for _ in 0..<500 where poll(&poller, 1, 10) == 0 { thread.interrupt() }
        thread.join()
        var result: UInt8 = 0
        #expect(read(results[0], &result, 1) == 1)
        #expect(result == 1)
        for fd in blocking + results { close(fd) }
    }

    @Test func processStartPrecedesNow() {
        #expect(MonotonicClock.processStart > 0)
        #expect(MonotonicClock.processStart < MonotonicClock.now)
        #expect(MonotonicClock.milliseconds(from: 1_000_000, to: 3_500_000) == 2.5)
    }
}
