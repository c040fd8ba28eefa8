import AgentProtocol
import Glibc
import SwiftletSystem
import Testing
import TestSupport

/// An ordinary guest process cannot pose as the guest agent (issue 17, finding 2): one that
/// connects to the agent's host port is refused (it connects from an unprivileged port), commands
/// still go to the real agent and report the real output, and after a restore the machine's new
/// identity reaches the real agent.
@Suite(.serialized, .enabled(if: TestHost.integration, "Linux-guest integration tests run in the nested test host: make test-nested"))
struct AgentImpostorIntegrationTests {
    let swiftlet = TestHost.swiftletBinary
    let home = TemporaryDirectory()

    func machine(_ arguments: [String]) -> Subprocess {
        Subprocess.run([swiftlet, "machine"] + arguments, environment: ["SWIFTLET_HOME": home.path], timeout: 600)
    }

    func exec(_ name: String, _ line: String) -> Subprocess {
        machine(["exec", name, "--", "sh", "-c", line])
    }

    @Test func anUnprivilegedGuestProcessCannotPoseAsTheAgent() throws {
        let impostor = try #require(TestHost.environment("SWIFTLET_AGENT_IMPOSTOR"), "scripts/test-nested builds Tests/Fixtures/agent-impostor.c")
        #expect(machine(["create", "--name", "box", "--memory", "128"]).status == 0)
        #expect(machine(["start", "box"]).status == 0)
        #expect(machine(["cp", impostor, "box:/tmp/agent-impostor"]).status == 0)
        #expect(exec("box", "chmod 755 /tmp/agent-impostor").status == 0)

        // As nobody: it may not bind a privileged port, and its connection is refused. Its child
        // keeps connecting (and would play the agent on any connection taken) for 10 minutes.
        let tried = machine(["exec", "box", "-u", "nobody", "--", "/tmp/agent-impostor", "\(AgentMessage.version)", "600"])
        #expect(tried.status == 0, "\(tried.stderr)")
        let lines = tried.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "bind 1000: Permission denied", "\(tried.stdout)")
        #expect(lines.count == 2 && lines[1].hasPrefix("connect: ") && lines[1] != "connect: ok", "\(tried.stdout)")

        // While it keeps trying, every command goes to the real agent.
        for round in 1...3 {
            let real = exec("box", "echo real \(round); hostname")
            #expect(real.status == 0 && real.stdout == "real \(round)\nbox\n", "\(real.stdout)|\(real.stderr)")
        }
        #expect(exec("box", "ps | grep -q '[/]tmp/agent-impostor' && echo trying").stdout == "trying\n", "the impostor is still at it")

        // A restore: the guest's processes (the impostor too) go on, the agent connects again, and
        // only it is told the machine's new name (with the random seed that goes with it).
        let snapshot = home.path + "/snap"
        #expect(machine(["snapshot", "box", "-o", snapshot]).status == 0)
        let restored = machine(["restore", snapshot, "--name", "back"])
        #expect(restored.status == 0, "\(restored.stderr)")
        for name in ["back", "box"] {
            let real = exec(name, "echo real; hostname")
            #expect(real.status == 0 && real.stdout == "real\n\(name)\n", "\(real.stdout)|\(real.stderr)")
            let log = exec(name, "cat /tmp/impostor.log 2>/dev/null; true")
            #expect(log.stdout.isEmpty, "the host took an impostor's connection in \(name): \(log.stdout)")
        }
        #expect(exec("back", "ps | grep -q '[/]tmp/agent-impostor' && echo trying").stdout == "trying\n")
        _ = machine(["stop", "back"])
        _ = machine(["stop", "box"])
    }
}
