// A program that embeds Swiftlet through its public API only (the `Swiftlet` product): it runs a
// command in a throwaway machine, then creates a persistent machine, runs a command in it,
// snapshots it, forks it, and cleans up.
//
//     swift run swiftlet-example [IMAGE]      # IMAGE: a registry reference, OCI layout or archive
//
// Machines run in VMM processes of their own, which are this program started again: so the
// first thing `main` does is answer that call.
import Glibc
import SwiftletKit

if let status = MachineServer.serveIfAsked() { exit(status) }

let arguments = CommandLine.arguments.dropFirst()
let root: CommandRun.Root = arguments.first.map { .image($0, policy: .missing, insecureRegistry: false) } ?? .defaultImage
let name = "swiftlet-example-\(getpid())"
let snapshot = "/tmp/\(name).snap"

func say(_ line: String) { print("example: " + line) }

@discardableResult
func step<T>(_ what: String, _ body: () throws -> T) -> T {
    do { return try body() } catch {
        say("\(what) failed: \(error)")
        try? Machines.remove(name, force: true)
        for clone in ["\(name)-fork"] { try? Machines.remove(clone, force: true) }
        exit(1)
    }
}

// 1. A command in a fresh machine: its output goes to ours, its status comes back.
var run = CommandRun(root: root)
run.command = ["sh", "-c", "echo hello from a throwaway machine; uname -r"]
let outcome = step("run") { try run.run(io: CommandRun.IO()) }
say("run exited \(outcome.status)")

// 2. A persistent machine: create, start, exec, snapshot, fork, remove.
step("create") { try Machines.create(Machines.Creation(name: name, root: root)) }
step("start") { try Machines.start(name) }
var write = Machines.Command(["sh", "-c", "echo kept > /root/note; hostname"])
write.ignoringEntrypoint = true
let wrote = step("exec") { try Machines.exec(name, write, io: CommandRun.IO()) }
say("exec exited \(wrote.status)")
let taken = step("snapshot") { try Machines.snapshot(name, to: snapshot) }
say("snapshot \(taken.id): \(taken.memoryPagesWritten) pages, paused \(taken.pausedMilliseconds) ms")
let fork = step("fork") { try Machines.fork(from: name, into: ["\(name)-fork"]) }
say("forked into \(fork.clones.joined(separator: ", ")) in \(Int(fork.totalMilliseconds)) ms")
var read = Machines.Command(["cat", "/root/note"])
read.ignoringEntrypoint = true
let copied = step("exec in the fork") { try Machines.exec("\(name)-fork", read, io: CommandRun.IO()) }
for machine in Machines.list() where machine.name.hasPrefix(name) { say("\(machine.name): \(machine.state)") }
step("remove") {
    try Machines.remove("\(name)-fork", force: true)
    try Machines.remove(name, force: true)
}
step("remove the snapshot") { try Machines.removeSnapshot(snapshot) }
say(copied.status == 0 && outcome.status == 0 && wrote.status == 0 ? "done" : "a command failed")
exit(copied.status == 0 && outcome.status == 0 && wrote.status == 0 ? 0 : 1)
