import AgentProtocol
import CGuestSupport
import Glibc

/// Sets up the guest's network for `configureNetwork`: the interface with the host's MAC gets its
/// MTU, IPv4 address and the default route, `lo` comes up, /etc/resolv.conf names the name
/// servers and /etc/hosts the gateway's host name. IPv6 needs nothing here: with the interface
/// up, the kernel takes an address from the network's router advertisements (SLAAC), as it does
/// by default (`accept_ra` 1, no forwarding). Last, one gratuitous ARP announces the guest (see
/// `guest_net_announce`: without it, passt cannot deliver a published port's first connections
/// to a guest that has sent nothing yet, which after a restore may be never). Every step may be
/// done again (a restored machine is sent the message again, and announces itself again).
enum Network {
    /// How long the interface may take to appear (the driver may still be probing the device).
    static let interfaceTimeoutMilliseconds = 1_000

    /// Why the network could not be set up, or nil once it is.
    static func configure(_ setup: NetworkSetup) -> String? {
        guard getpid() == 1 else { return "the agent is not the guest's init: it does not set up this system's network" }
        do { try setup.validate() } catch { return error.description }
        guard let address = NetworkSetup.ipv4(setup.address), let gateway = NetworkSetup.ipv4(setup.gateway) else {
            return "the network addresses are not IPv4 addresses"
        }
        guard let interface = waitForInterface(mac: setup.macText) else {
            return "the guest has no network interface with the MAC address \(setup.macText) after \(interfaceTimeoutMilliseconds) ms "
                + "(a guest kernel without virtio-net, or a machine without a network device)"
        }
        func step(_ what: String, _ result: Int32) -> String? {
            result == 0 ? nil : "cannot \(what): \(String(cString: strerror(-result)))"
        }
        // The guest is alone on its link with passt: duplicate address detection can find
        // nothing, and would hold the link-local address back (and send frames) for a second
        // after every boot, and after every restore of a template saved in that second.
        // Best effort, as every IPv6 setting here: a kernel without IPv6 has no such file.
        _ = writeSysctl("/proc/sys/net/ipv6/conf/\(interface)/accept_dad", "0")
        _ = writeSysctl("/proc/sys/net/ipv6/conf/\(interface)/dad_transmits", "0")
        if let failure = step("bring up lo", guest_net_up("lo"))
            ?? step("set the MTU of \(interface) to \(setup.mtu)", guest_net_set_mtu(interface, setup.mtu))
            ?? step("give \(interface) the address \(setup.address)/\(setup.prefixLength)",
                    guest_net_set_ipv4(interface, address, UInt32(setup.prefixLength)))
            ?? step("bring up \(interface)", guest_net_up(interface))
            ?? step("add the default route via \(setup.gateway)", guest_net_add_default_route(interface, gateway))
            ?? step("announce \(setup.address) on \(interface)", setup.mac.withUnsafeBufferPointer { guest_net_announce(interface, $0.baseAddress, address) }) {
            return failure
        }
        _ = writeSysctl("/proc/sys/net/ipv6/conf/\(interface)/accept_ra", "1")
        // Any user may use ICMP echo sockets (`ping` without privileges), as container runtimes allow.
        _ = writeSysctl("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        if let failure = GuestSetup.makeDirectoryOrFail("/etc") { return failure }
        if !setup.dns.isEmpty {
            let text = "# Written by swiftlet-init\n" + setup.dns.map { "nameserver \($0)\n" }.joined()
            if let failure = replaceFile("/etc/resolv.conf", with: text) { return failure }
        }
        if !setup.hostName.isEmpty {
            if let failure = replaceFile("/etc/hosts", with: hosts(adding: setup.hostName, at: setup.gateway,
                                                                   to: try? readText("/etc/hosts"))) {
                return failure
            }
        }
        return nil
    }

    /// The interface whose MAC address is `mac` (as /sys/class/net/*/address prints it), waiting
    /// up to `interfaceTimeoutMilliseconds` for it to appear.
    static func waitForInterface(mac: String) -> String? {
        let deadline = GuestSetup.monotonicMilliseconds() + interfaceTimeoutMilliseconds
        while true {
            if let name = interface(mac: mac) { return name }
            guard GuestSetup.monotonicMilliseconds() < deadline else { return nil }
            usleep(20_000)
        }
    }

    static func interface(mac: String) -> String? {
        guard let directory = opendir("/sys/class/net") else { return nil }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: entry.pointee.d_name)) { String(cString: $0) }
            }
            guard !name.hasPrefix("."), name.utf8.count < 16 else { continue }
            let text = (try? readText("/sys/class/net/\(name)/address")) ?? ""
            if text.split(separator: "\n").first.map({ $0.lowercased() == mac }) == true { return name }
        }
        return nil
    }

    /// /etc/hosts as it was (`existing`, or the usual localhost lines when there was none) without
    /// the lines that named `name`, and with a line giving `name` the address `address`.
    static func hosts(adding name: String, at address: String, to existing: String?) -> String {
        let old = existing ?? "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        var lines = old.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if lines.last == "" { lines.removeLast() }
        lines.removeAll { line in
            let content = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            return content.split(whereSeparator: { $0 == " " || $0 == "\t" }).dropFirst().contains { $0 == name }
        }
        lines.append("\(address)\t\(name)")
        return lines.joined(separator: "\n") + "\n"
    }

    /// Writes `text` to a new file beside `path` and renames it over `path`: the reader sees the
    /// old file or the new one, and a symbolic link there (to a resolver daemon's file that does
    /// not exist in this machine) is replaced, not followed. Returns why it could not, or nil.
    static func replaceFile(_ path: String, with text: String) -> String? {
        let temporary = path + ".swiftlet-new"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { return "cannot write \(path): \(String(cString: strerror(errno)))" }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            let failure = "cannot write \(path): \(String(cString: strerror(errno)))"
            close(fd); unlink(temporary)
            return failure
        }
        fchmod(fd, 0o644)
        close(fd)
        guard rename(temporary, path) == 0 else {
            let failure = "cannot replace \(path): \(String(cString: strerror(errno)))"
            unlink(temporary)
            return failure
        }
        return nil
    }

    static func writeSysctl(_ path: String, _ value: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var text = value + "\n"
        return text.withUTF8 { write(fd, $0.baseAddress, $0.count) } == text.utf8.count
    }
}
