import SwiftletSystem

/// What happened during a run, for `--boot-timing`, benchmarks and callers of the library.
public struct MachineRunReport: Sendable {
    public var exit: MachineExit
    /// CLOCK_MONOTONIC readings (ns): process start, first KVM_RUN, boot marker, and the end.
    public var processStart: UInt64
    public var firstRun: UInt64
    public var bootMarker: UInt64?
    public var end: UInt64
    /// Returns from KVM_RUN to Swiftlet, over all vCPUs.
    public var exitsToUserspace: UInt64
    /// Guest memory resident on the host at the end (touched by guest or VMM).
    public var guestMemoryResidentBytes: Int
    /// Peak resident set of the whole process (VmHWM).
    public var peakResidentBytes: Int
    /// I/O port accesses by port, when tracing was asked for (SWIFTLET_TRACE_IO=1).
    public var portTrace: [UInt16: Int]
    /// When each set-up phase ended (CLOCK_MONOTONIC ns), in order: where the set-up time goes.
    public var phases: [(name: String, end: UInt64)]
    /// Device complaints during the run (a malformed request, a failed disk write), oldest first.
    public var warnings: [String]

    /// Peak RSS minus guest memory: what the VMM itself costs.
    public var vmmOverheadBytes: Int { max(0, peakResidentBytes - guestMemoryResidentBytes) }
}
