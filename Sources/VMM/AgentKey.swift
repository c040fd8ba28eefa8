import AgentProtocol
import SwiftletSystem

/// The secret that tells a machine's guest agent from every other guest process
/// (`AgentAuthentication`). The host makes it for a boot and gives it to the agent on the
/// machine's first session, before any other guest process runs; the agent keeps it in memory,
/// so every snapshot, restore and fork of the machine has it, and the host keeps it in each
/// snapshot's state (`MachineSnapshot.agentKey`) to check the agent of a restored copy.
///
/// Whoever has a snapshot's state file has its key: that is the snapshot's maker or someone it
/// was given to, and it is their machine.
public struct AgentKey: Codable, Sendable, Equatable {
    @HexBytes public var bytes: [UInt8]

    init(bytes: [UInt8]) { self.bytes = bytes }

    /// A new key from the host's random generator.
    static func random() throws(SwiftletError) -> AgentKey {
        AgentKey(bytes: try randomBytes(AgentAuthentication.keyLength))
    }

    /// `count` bytes from the host's random generator.
    static func randomBytes(_ count: Int) throws(SwiftletError) -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 8)
        defer { buffer.deallocate() }
        try SystemRandom.fill(buffer)
        return Array(buffer.bindMemory(to: UInt8.self))
    }
}

/// Where a machine stands with its agent's key.
enum AgentKeyState: Sendable {
    /// Booted, and no agent has shown it holds a key yet: each session is given this one (made
    /// when the first session opens) before it is asked to prove it.
    case toGive(AgentKey?)
    /// The agent holds this key (it proved it, or the snapshot says so): every session proves it.
    case held(AgentKey)
    /// Restored from a snapshot with no key (taken before its agent had one): no connection can
    /// be told from another guest process's, so none is trusted.
    case missing
}

extension Machine {
    /// The key the next agent session must prove it holds, and whether to give it first.
    func agentKeyForSession() throws(SwiftletError) -> (key: AgentKey, give: Bool) {
        try agentKey.withLock { state throws(SwiftletError) in
            switch state {
            case .held(let key):
                return (key, false)
            case .toGive(let key?):
                return (key, true)
            case .toGive(nil):
                let key = try AgentKey.random()
                state = .toGive(key)
                return (key, true)
            case .missing:
                throw SwiftletError(.unsupported, "the snapshot this machine was restored from holds no agent key (it was taken before its guest agent was ready, or by an older Swiftlet): its agent cannot be told from other guest processes; take the snapshot again")
            }
        }
    }

    /// An agent proved it holds `key`: from now on every session must prove it, and snapshots keep it.
    func agentHolds(_ key: AgentKey) {
        agentKey.withLock { $0 = .held(key) }
    }

    /// The key a snapshot keeps: the one the agent holds, if it holds one.
    var heldAgentKey: AgentKey? {
        agentKey.withLock { if case .held(let key) = $0 { key } else { nil } }
    }
}
