import Hypervisor
import MachineState
import SwiftletNet
import SwiftletSystem
import Testing
@testable import VMM

/// A snapshot's network device: its MAC and MTU come back with the state file, a restore joins
/// them to the backend it is given, and a state and a restore that do not agree on having a NIC
/// (or a state with an MTU no device can have) are refused before anything is built.
@Suite struct NetworkSnapshotTests {
    let mac = try! MACAddress(parsing: "02:53:57:aa:bb:cc")
    let policy = NetworkConfiguration(allowedHosts: [try! HostPattern(parsing: "api.example.com")],
                                      published: [PortPublication(hostPort: 8080, guestPort: 80)])

    /// A plan for a snapshot whose machine had `network` (nil: no NIC), after a trip through the state file.
    func plan(network: SnapshotNetwork?) throws -> RestorePlan {
        let shape = MachineShape(cpuCount: 1, memoryMiB: 64, disks: [], entropyDevice: false, vsock: nil)
        var hardware = SnapshotHardware(shape, diskSizes: [])
        hardware.network = network
        let snapshot = MachineSnapshot(
            id: .init(bytes: Array(repeating: 7, count: 16)), kind: .full, parent: nil, parentDirectory: nil, createdAt: 0,
            hardware: hardware, guestIsLinux: true, cpuid: [[]], vcpus: [],
            vm: VMState(interruptControllers: [], pit: nil, clock: 0, clockRealtime: nil),
            devices: ["serial0": DeviceState(serial: .reset)], annotations: [:], agentKey: nil)
        let decoded = try StateFile.decode(MachineSnapshot.self, from: try StateFile.encode(snapshot), path: "state")
        #expect(decoded.hardware.network == network, "the NIC survives the state file")
        return RestorePlan(snapshot: decoded, directory: SnapshotDirectory("/snap"), memoryChain: [])
    }

    func message(_ body: () throws -> Void) -> String {
        do { try body() } catch let error as SwiftletError { return error.message } catch { return "\(error)" }
        return "no error"
    }

    @Test func aRestoredNICKeepsTheSnapshotsMACAndMTUUnderTheGivenPolicy() throws {
        let saved = SnapshotNetwork(mac: mac, mtu: 1500, policy: policy)
        let given = NetworkDeviceConfig(guest: .default, policy: NetworkConfiguration(allowAll: true), backend: 42)
        let nic = try #require(try plan(network: saved).checkedNetwork(given))
        #expect(nic.guest.guestMAC == mac && nic.guest.mtu == 1500, "the guest's driver knows these: they cannot change")
        #expect(nic.policy == given.policy && nic.backend == 42, "the policy and the backend are the restore's")
        #expect(try plan(network: nil).checkedNetwork(nil) == nil)
    }

    @Test func aNICWithoutABackendOrABackendWithoutANICIsRefused() throws {
        let saved = SnapshotNetwork(mac: mac, mtu: 65520, policy: policy)
        #expect(message { _ = try plan(network: saved).checkedNetwork(nil) }
                == "the machine in the snapshot in /snap has a network device: restore it with a network backend for it")
        let given = NetworkDeviceConfig(policy: NetworkConfiguration(allowAll: true), backend: 3)
        #expect(message { _ = try plan(network: nil).checkedNetwork(given) }
                == "the machine in the snapshot in /snap has no network device: it cannot be given a network when restored")
    }

    @Test func anMTUNoDeviceCanHaveIsRefused() throws {
        let given = NetworkDeviceConfig(policy: NetworkConfiguration(allowAll: true), backend: 3)
        for mtu in [-1, 0, 67, 65536, Int.max] {
            let bad = SnapshotNetwork(mac: mac, mtu: mtu, policy: policy)
            #expect(message { _ = try plan(network: bad).checkedNetwork(given) } == "the snapshot in /snap records a network MTU of \(mtu)")
        }
        for mtu in [68, 1500, 65535] {
            #expect(try plan(network: SnapshotNetwork(mac: mac, mtu: mtu, policy: policy)).checkedNetwork(given)?.guest.mtu == mtu)
        }
    }

    /// SnapshotNetwork's shape with the MAC as any text: what a forged state file could hold.
    struct ForgedNetwork: Codable {
        var mac: String
        var mtu: Int
        var policy: NetworkConfiguration
    }

    @Test func aStateWithAMalformedMACDoesNotDecode() throws {
        let good = try StateFile.encode(ForgedNetwork(mac: "02:53:57:aa:bb:cc", mtu: 1500, policy: policy))
        #expect(try StateFile.decode(SnapshotNetwork.self, from: good, path: "state") == SnapshotNetwork(mac: mac, mtu: 1500, policy: policy))
        for bad in ["02:53:57:aa:bb", "02:53:57:aa:bb:cc:dd", "zz:53:57:aa:bb:cc", "2:53:57:aa:bb:cc", ""] {
            let forged = try StateFile.encode(ForgedNetwork(mac: bad, mtu: 1500, policy: policy))
            #expect(throws: (any Error).self, "MAC '\(bad)'") { _ = try StateFile.decode(SnapshotNetwork.self, from: forged, path: "state") }
        }
    }
}
