import AgentProtocol
import Glibc
import Synchronization
import SwiftletNet
import SwiftletSystem
import VMM

/// The host side of a machine's network while it runs: its own passt process (the user-mode
/// network stack, published ports bound there) and the socket the machine's NIC is joined to.
/// passt ends with this value, and with the process that started it, whatever ends that.
final class MachineNetwork: Sendable {
    let policy: NetworkConfiguration
    let guest: GuestNetwork
    private let logFile: String?
    private let passt: Mutex<PasstProcess?>
    private let socket: OwnedFileDescriptor
    /// passt's end of the socket pair, until passt starts (a deferred network, `start`).
    private let far: Mutex<OwnedFileDescriptor?>

    /// Starts passt for `policy` (which must ask for a network); `logFile`: passt's own log.
    /// Returns while passt still sets itself up: the machine is built meanwhile, and
    /// `configureGuest` waits for passt before the guest's interface comes up.
    init(policy: NetworkConfiguration, guest: GuestNetwork = .default, logFile: String?) throws(SwiftletError) {
        let started = try PasstProcess.launch(network: guest, configuration: policy, logFile: logFile)
        self.policy = policy
        self.guest = guest
        self.logFile = logFile
        self.passt = Mutex(started.process)
        self.socket = started.socket
        self.far = Mutex(nil)
    }

    /// A network whose passt starts later (`start`), for a machine that arrives by migration:
    /// its NIC is joined to the socket now, its published ports are bound only once the source
    /// let them go.
    init(deferred policy: NetworkConfiguration, guest: GuestNetwork = .default, logFile: String?) throws(SwiftletError) {
        let pair = try UnixSocket.pair()
        self.policy = policy
        self.guest = guest
        self.logFile = logFile
        self.passt = Mutex(nil)
        self.socket = pair.first
        self.far = Mutex(pair.second)
    }

    deinit { stop() }

    /// Starts a deferred network's passt and waits until it is ready. A published port still in
    /// use is tried again for up to `busyPortMilliseconds` (the source of a migration on this
    /// host lets its ports go as it ends). Does nothing for a network that started at once.
    func start(busyPortMilliseconds: Int) throws(SwiftletError) {
        try far.withLock { (far: inout OwnedFileDescriptor?) throws(SwiftletError) in
            guard let end = far.take() else { return }
            let deadline = MonotonicClock.now + UInt64(max(0, busyPortMilliseconds)) * 1_000_000
            while true {
                let process = try PasstProcess.launch(network: guest, configuration: policy, logFile: logFile,
                                                      on: end.rawValue, near: socket.rawValue)
                do throws(SwiftletError) {
                    try process.waitUntilReady()
                    passt.withLock { $0 = process }
                    return
                } catch {
                    process.stopLeavingSocket()
                    guard error.code == .invalidArgument, error.message.contains("in use"), MonotonicClock.now < deadline else {
                        far = consume end
                        throw error
                    }
                    usleep(50_000)
                }
            }
        }
    }

    /// The NIC of a machine joined to this network; `log` takes the lines of blocked attempts.
    func device(log: (@Sendable (String) -> Void)?) -> NetworkDeviceConfig {
        NetworkDeviceConfig(guest: guest, policy: policy, backend: socket.rawValue, log: log)
    }

    /// Ends passt (`PasstProcess.stop`: the machine's NIC sees its backend close).
    func stop() {
        passt.withLock { $0 }?.stop()
    }

    /// Waits until passt is ready; throws why it is not (a port it could not bind, by name).
    func ready() throws(SwiftletError) {
        guard let process = passt.withLock({ $0 }) else {
            throw SwiftletError(.invalidArgument, "the machine's network has not started")
        }
        try process.waitUntilReady()
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
