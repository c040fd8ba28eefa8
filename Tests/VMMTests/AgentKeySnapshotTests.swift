import Hypervisor
import MachineState
import SwiftletSystem
import Testing
@testable import VMM

/// The agent key goes into a snapshot's state and comes back with a restore, whose agent must
/// then prove it; a restore of a state without one trusts no agent connection.
@Suite struct AgentKeySnapshotTests {
    let shape = MachineShape(cpuCount: 1, memoryMiB: 64, disks: [], entropyDevice: false, vsock: nil)

    func restored(agentKey: AgentKey?) throws -> Machine {
        let snapshot = MachineSnapshot(
            id: .init(bytes: Array(repeating: 1, count: 16)), kind: .full, parent: nil, parentDirectory: nil, createdAt: 0,
            hardware: SnapshotHardware(shape, diskSizes: []), guestIsLinux: true, cpuid: [[]], vcpus: [],
            vm: VMState(interruptControllers: [], pit: nil, clock: 0, clockRealtime: nil),
            devices: ["serial0": DeviceState(serial: .reset)], annotations: [:], agentKey: agentKey)
        let decoded = try StateFile.decode(MachineSnapshot.self, from: try StateFile.encode(snapshot), path: "state")
        #expect(decoded.agentKey == agentKey)
        let plan = RestorePlan(snapshot: decoded, directory: SnapshotDirectory("/snap"), memoryChain: [])
        return Machine(restoring: plan, shape: shape, vsockPorts: nil, hypervisor: Machine.defaultHypervisor)
    }

    @Test func aRestoredMachineExpectsTheKeyItsSnapshotKept() throws {
        let key = AgentKey(bytes: (0..<32).map { UInt8($0) })
        let machine = try restored(agentKey: key)
        let expected = try machine.agentKeyForSession()
        #expect(expected.key == key && !expected.give, "the restored agent already holds it: it is never given again")
        #expect(machine.heldAgentKey == key, "and the machine's own snapshots keep it")
    }

    @Test func aRestoreOfAStateWithoutAKeyTrustsNoAgentConnection() throws {
        let machine = try restored(agentKey: nil)
        let error = #expect(throws: SwiftletError.self) { try machine.agentKeyForSession() }
        #expect(error?.message.contains("holds no agent key") == true, "\(String(describing: error))")
        #expect(machine.heldAgentKey == nil)
    }

    @Test func aBootedMachineMakesOneKeyAndGivesItUntilItsAgentHoldsIt() throws {
        let machine = Machine(config: MachineConfig(kernelPath: "/nonexistent/vmlinux", cpuCount: 1, memoryMiB: 64))
        let first = try machine.agentKeyForSession(), again = try machine.agentKeyForSession()
        #expect(first.give && again.give && first.key == again.key)
        #expect(machine.heldAgentKey == nil, "a snapshot before the agent proved it keeps no key")
        machine.agentHolds(first.key)
        let later = try machine.agentKeyForSession()
        #expect(!later.give && later.key == first.key && machine.heldAgentKey == first.key)
    }
}
