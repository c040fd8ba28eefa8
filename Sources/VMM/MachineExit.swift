/// How a machine's run ended.
public enum MachineExit: Sendable, Equatable, CustomStringConvertible {
    /// The guest powered off (ACPI S5).
    case powerOff
    /// The guest reset the machine (i8042 reset, `reboot`). Swiftlet does not restart it.
    case reset
    /// The guest kernel panicked (reported through pvpanic).
    case guestPanic
    /// A vCPU triple-faulted. `rip` is where, when the CPU still shows it: on AMD, KVM puts a
    /// vCPU that shut down back into its reset state, so the faulting RIP is gone (nil).
    case tripleFault(cpu: UInt32, rip: UInt64?)
    /// KVM could not run the guest: an instruction it could not emulate, for example.
    case internalError(cpu: UInt32, rip: UInt64, detail: String, instructionBytes: [UInt8]?)
    /// The hardware refused to enter the guest.
    case failedEntry(cpu: UInt32, reason: UInt64)
    /// The VMM failed while running the guest.
    case vmmError(String)
    /// The host stopped the machine (`Machine.stop()`): its work was done.
    case stopped
    /// The machine moved to another host (`migrate`), which runs it now.
    case migrated

    /// Whether this is an orderly end (power off or reboot) rather than a crash.
    public var isClean: Bool {
        switch self {
        case .powerOff, .reset, .stopped, .migrated: return true
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .powerOff: return "the guest powered off"
        case .reset: return "the guest rebooted"
        case .stopped: return "the host stopped the machine"
        case .migrated: return "the machine moved to another host"
        case .guestPanic: return "the guest kernel panicked (see its console output above)"
        case .tripleFault(let cpu, let rip):
            let place = rip.map { " at rip 0x\(String($0, radix: 16))" } ?? ""
            return "vCPU \(cpu) triple-faulted\(place): the guest kernel crashed before it could report a panic"
        case .internalError(let cpu, let rip, let detail, let bytes):
            var s = "KVM could not run vCPU \(cpu): \(detail) at rip 0x\(String(rip, radix: 16))"
            if let bytes, !bytes.isEmpty {
                s += ", instruction bytes " + bytes.map { b in (b < 16 ? "0" : "") + String(b, radix: 16) }.joined(separator: " ")
            }
            return s
        case .failedEntry(let cpu, let reason):
            return "the CPU refused to enter vCPU \(cpu) (hardware entry failure reason 0x\(String(reason, radix: 16)))"
        case .vmmError(let message):
            return message
        }
    }
}
