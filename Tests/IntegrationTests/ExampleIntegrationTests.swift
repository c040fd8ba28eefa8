import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// The example program (Examples/swiftlet-example), which reaches Swiftlet through the public
/// library API only: a command in a throwaway machine, then a persistent machine created, exec'd
/// into, snapshotted, forked and removed.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct ExampleIntegrationTests {
    @Test func theExampleProgramRunsACommandAndForksAMachine() throws {
        let example = try #require(TestHost.exampleBinary, "swiftlet-example is built beside the test bundle (swift build --build-tests)")
        let home = TemporaryDirectory()
        let result = Subprocess.run([example], environment: ["SWIFTLET_HOME": home.path], timeout: 600)
        let transcript = "stdout:\n\(result.stdout)\nstderr:\n\(result.stderr)"
        #expect(result.status == 0, "\(transcript)")
        let lines = result.stdout.split(separator: "\n").map(String.init)
        #expect(lines.contains("hello from a throwaway machine"), "the throwaway machine's output: \(transcript)")
        #expect(lines.contains("example: run exited 0"))
        #expect(lines.contains("example: exec exited 0"))
        #expect(lines.contains { $0.hasPrefix("example: snapshot ") && $0.contains(" pages, paused ") }, "\(transcript)")
        #expect(lines.contains { $0.hasPrefix("example: forked into swiftlet-example-") }, "\(transcript)")
        #expect(lines.contains("kept"), "the fork sees the file the machine wrote before the snapshot: \(transcript)")
        #expect(lines.last == "example: done", "\(transcript)")
        // It cleans up: no machine is left in its store (only the store's lock), and the disk the
        // fork's clones shared went with the last of them.
        let left = (OwnedFileDescriptor.directoryEntries(home.path + "/machines") ?? []).map(\.name).filter { $0 != ".lock" && $0 != ".forks" }
        #expect(left.isEmpty, "machines left behind: \(left)")
        let shared = (OwnedFileDescriptor.directoryEntries(home.path + "/machines/.forks") ?? []).map(\.name)
        #expect(shared.isEmpty, "fork disks left behind: \(shared)")
    }
}
