import ArgumentParser
import SwiftletNet
import SwiftletSystem

/// The network options of `run` and `machine create`: none gives the machine no network device.
struct NetworkOptions: ParsableArguments {
    @Flag(help: "Give the machine outbound network access (user-mode NAT through passt: no root, no host configuration).")
    var net = false

    @Option(name: .customLong("allow-host"),
            help: ArgumentHelp("Allow outbound traffic only to this host name (exact, or *.example.com for its subdomains); the guest's DNS answers other names NXDOMAIN. Repeatable; implies a network.", valueName: "name"))
    var allowedHosts: [String] = []

    @Option(name: .customLong("allow-cidr"),
            help: ArgumentHelp("Allow outbound traffic only to this IPv4 or IPv6 range (10.1.0.0/16, 2001:db8::/32, or one address). Repeatable; implies a network.", valueName: "cidr"))
    var allowedCIDRs: [String] = []

    @Option(name: [.customShort("p"), .customLong("publish")],
            help: ArgumentHelp("Publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (HOST_IP defaults to 127.0.0.1). Repeatable; gives no outbound access by itself.", valueName: "port"))
    var published: [String] = []

    /// The policy the options ask for (no network when none is given).
    /// Whether any network option was given.
    var asksForNetwork: Bool { net || !allowedHosts.isEmpty || !allowedCIDRs.isEmpty || !published.isEmpty }

    func configuration() throws(SwiftletError) -> NetworkConfiguration {
        var configuration = NetworkConfiguration(allowAll: net)
        for host in allowedHosts { configuration.allowedHosts.append(try HostPattern(parsing: host)) }
        for cidr in allowedCIDRs { configuration.allowedCIDRs.append(try CIDR(parsing: cidr)) }
        for publication in published { configuration.published.append(try PortPublication(parsing: publication)) }
        var seen = Set<String>()
        for publication in configuration.published {
            let key = "\(publication.hostAddress) \(publication.hostPort) \(publication.transport)"
            guard seen.insert(key).inserted else {
                throw SwiftletError(.invalidArgument, "-p \(publication): host port \(publication.hostPort)/\(publication.transport.rawValue) is published twice")
            }
        }
        return configuration
    }

    var isEmpty: Bool { !net && allowedHosts.isEmpty && allowedCIDRs.isEmpty && published.isEmpty }
}
