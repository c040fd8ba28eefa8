import Glibc
import MachineState
import SwiftletKit
import SwiftletSystem
import Testing

/// The use cases without a guest: arguments checked before anything is made, names, the VMM
/// process's invocation, and the snapshot directory's layout.
@Suite struct SwiftletKitTests {
    @Test func theImageEnvironmentGivesWayToTheCommandLines() {
        #expect(ExecDefaults.merge(["PATH=/bin", "A=1", "B"], ["A=2", "C=3"]) == ["PATH=/bin", "B", "A=2", "C=3"])
    }

    @Test func aCommandRequestUsesTheImageDefaultsUnderTheFlags() throws {
        let defaults = ExecDefaults(entrypoint: ["/entry"], command: ["serve"], environment: ["X=1"], workingDirectory: "/app", user: "app")
        let request = try defaults.request(command: [], environment: ["X=2"], workdir: nil, user: "root", what: "image")
        #expect(request.arguments == ["/entry", "serve"] && request.environment == ["X=2"] && request.workingDirectory == "/app" && request.user == "root")
        let empty = ExecDefaults(entrypoint: [], command: [], environment: [], workingDirectory: "/", user: "")
        #expect { try empty.request(command: [], environment: [], workdir: nil, user: nil, what: "the image") } throws: {
            ($0 as! SwiftletError).message == "the image has no entrypoint or command: give one after --"
        }
    }

    @Test func badMachineCreationsAreRefusedBeforeAnythingIsMade() {
        var creation = Machines.Creation(name: "../escape")
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("is not a machine name") }
        creation.name = "ok"
        creation.cpus = 0
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message == "--cpus must be 1 to 254" }
        creation.cpus = 1
        creation.memoryMiB = 8
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("--memory must be at least") }
        creation.memoryMiB = 256
        creation.diskMiB = 1
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("--disk-size") }
        creation.diskMiB = 2048
        creation.root = .snapshot("/tmp/x")
        #expect { try Machines.create(creation) } throws: { ($0 as! SwiftletError).message.contains("`restore` makes one") }
    }

    @Test func onlyTheVMMInvocationIsServed() {
        #expect(MachineServer.serveIfAsked(["run", "--", "true"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine", "serve"]) == nil)
        #expect(MachineServer.serveIfAsked(["machine", "serve", "../bad"]) == ExitStatus.setupFailed)
        #expect(MachineServer.serveIfAsked(["machine", "serve", "ok", "--bogus"]) == ExitStatus.setupFailed)
    }

    @Test func aSnapshotNamesOnlyItsOwnDiskFiles() throws {
        let directory = SnapshotDirectory("/snapshots/a")
        #expect(try directory.diskPath(named: "disk-0") == "/snapshots/a/disk-0")
        #expect(SnapshotDirectory.diskFileName(3) == "disk-3")
        for hostile in ["../disk-0", "/dev/sda", "disk-", "disk-01", "disk--1", "disk-0/../../x", ""] {
            #expect(throws: SwiftletError.self) { try directory.diskPath(named: hostile) }
        }
        #expect(directory.statePath == "/snapshots/a/state" && directory.memoryPath == "/snapshots/a/memory")
    }

    @Test func aMissingSnapshotIsNotRemoved() throws {
        let path = "/tmp/swiftlet-kit-test-\(getpid())"
        #expect(mkdir(path, 0o700) == 0)
        defer { rmdir(path) }
        #expect { try Machines.removeSnapshot(path) } throws: { ($0 as! SwiftletError).message.contains("is not a Swiftlet snapshot") }
        #expect(access(path, F_OK) == 0)
    }
}
