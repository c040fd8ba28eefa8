/// A dictionary whose entries expire and whose size is bounded: inserting into a full table
/// first drops the expired entries, then, if it is still full, the entry closest to expiry (for
/// tables whose entries all live equally long: the oldest).
struct ExpiringTable<Key: Hashable, Value> {
    struct Entry { var value: Value; var expiry: UInt64 }
    private(set) var entries: [Key: Entry] = [:]
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        entries.reserveCapacity(capacity)
    }

    var count: Int { entries.count }

    /// The value for `key` if it has not expired at `now`.
    func value(_ key: Key, now: UInt64) -> Value? {
        guard let entry = entries[key], entry.expiry > now else { return nil }
        return entry.value
    }

    /// Moves an existing live entry's expiry to at least `expiry`; false when there is none.
    mutating func extend(_ key: Key, to expiry: UInt64, now: UInt64) -> Bool {
        guard let entry = entries[key], entry.expiry > now else { return false }
        if expiry > entry.expiry { entries[key]!.expiry = expiry }
        return true
    }

    mutating func insert(_ key: Key, _ value: Value, expiry: UInt64, now: UInt64) {
        if entries[key] == nil && entries.count >= capacity {
            entries = entries.filter { $0.value.expiry > now }
            if entries.count >= capacity, let oldest = entries.min(by: { $0.value.expiry < $1.value.expiry }) {
                entries[oldest.key] = nil
            }
        }
        entries[key] = Entry(value: value, expiry: expiry)
    }

    @discardableResult
    mutating func remove(_ key: Key) -> Value? { entries.removeValue(forKey: key)?.value }
}

/// A flow a published port started: the peer (as the guest sees it) and the guest's port.
struct FlowKey: Hashable {
    var remote: IPAddress
    var remotePort: UInt16
    var guestPort: UInt16
    var transport: UInt8
}

/// A DNS query the filter let through, by its id and the guest's source port.
struct QueryKey: Hashable {
    var id: UInt16
    var guestPort: UInt16
}

/// What a blocked attempt is logged under (once per key per `EgressFilter.logInterval`).
enum LogKey: Hashable {
    case destination(IPAddress, UInt16, UInt8)
    case name(String)
    case rebinding(IPAddress)
}

/// Address ranges with a meaning of their own (RFC 6890 and successors).
enum SpecialRanges {
    private static func cidrs(_ texts: [String]) -> [CIDR] { texts.map { try! CIDR(parsing: $0) } }

    /// Cloud metadata services: blocked even in open mode unless a CIDR names them.
    static let metadata = cidrs(["169.254.0.0/16", "fd00:ec2::254/128"])

    /// Addresses a DNS answer must not make reachable unless a CIDR allows them (DNS rebinding):
    /// "this network", private, CGNAT, loopback, link-local, IETF protocol assignments,
    /// benchmarking, multicast, reserved and broadcast; IPv6 unspecified/loopback and the old
    /// IPv4-compatible range, IPv4-mapped, local-use NAT64, unique local, link-local, site-local
    /// and multicast.
    static let notLearned = cidrs([
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
        "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "::ffff:0:0/96", "64:ff9b:1::/48", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    ])

    /// Destinations an error is never sent about (RFC 1122 §3.2.2): multicast and broadcast.
    static func isGroup(_ address: IPAddress) -> Bool {
        switch address {
        case .v4(let a): return a >> 28 == 0xE || a == 0xFFFF_FFFF
        case .v6(let high, _): return high >> 56 == 0xFF
        }
    }

    /// IPv6 link-scope multicast (ff02::/16): neighbour discovery and MLD go there.
    static func isLinkLocalMulticast(_ address: IPAddress) -> Bool {
        if case .v6(let high, _) = address { return high >> 48 == 0xFF02 }
        return false
    }
}
