import AgentProtocol
import SwiftletNet
import SwiftletSystem
import VMM

/// The host side of a machine's network while it runs: its own passt process (the user-mode
/// network stack, published ports bound there) and the socket the machine's NIC is joined to.
/// passt ends with this value, and with the process that started it, whatever ends that.
final class MachineNetwork: Sendable {
    let policy: NetworkConfiguration
    let guest: GuestNetwork
    private let passt: PasstProcess
    private let socket: OwnedFileDescriptor

    /// Starts passt for `policy` (which must ask for a network); `logFile`: passt's own log.
    /// Returns while passt still sets itself up: the machine is built meanwhile, and
    /// `configureGuest` waits for passt before the guest's interface comes up.
    init(policy: NetworkConfiguration, guest: GuestNetwork = .default, logFile: String?) throws(SwiftletError) {
        let started = try PasstProcess.launch(network: guest, configuration: policy, logFile: logFile)
        self.policy = policy
        self.guest = guest
        self.passt = started.process
        self.socket = started.socket
    }

    deinit { stop() }

    /// The NIC of a machine joined to this network; `log` takes the lines of blocked attempts.
    func device(log: (@Sendable (String) -> Void)?) -> NetworkDeviceConfig {
        NetworkDeviceConfig(guest: guest, policy: policy, backend: socket.rawValue, log: log)
    }

    /// Ends passt (`PasstProcess.stop`: the machine's NIC sees its backend close).
    func stop() {
        passt.stop()
    }

    /// Waits until passt is ready; throws why it is not (a port it could not bind, by name).
    func ready() throws(SwiftletError) {
        try passt.waitUntilReady()
    }

    /// Once passt is ready (`ready`), has the guest's agent configure its interface.
    func configureGuest(through agent: AgentSession) throws(SwiftletError) {
        try ready()
        try agent.configureNetwork(setup)
    }

    /// What the guest's agent is told to configure.
    var setup: NetworkSetup { Self.setup(for: guest) }

    static func setup(for guest: GuestNetwork) -> NetworkSetup {
        NetworkSetup(address: guest.guestAddress.description, prefixLength: UInt8(clamping: guest.prefixLength),
                     gateway: guest.gateway.description, dns: [guest.dns.description], mtu: UInt32(clamping: guest.mtu),
                     hostName: GuestNetwork.hostName, mac: guest.guestMAC.bytes)
    }
}
