import Devices
import SwiftletSystem

/// A machine's memory as its balloon sees it (`Machine.memoryStatus`).
public struct MemoryStatus: Sendable, Codable, Equatable {
    /// The guest's RAM.
    public var memoryBytes: UInt64
    /// The memory the guest is asked to keep (its RAM less the balloon's target).
    public var targetBytes: UInt64
    /// What the guest's driver says it has handed over to the balloon now.
    public var balloonBytes: UInt64
    /// Free memory the guest reported and the host took back, since the machine started.
    public var reportedBytes: UInt64
    /// Guest memory resident in this process now (mincore over guest RAM).
    public var residentBytes: UInt64

    public init(memoryBytes: UInt64, targetBytes: UInt64, balloonBytes: UInt64, reportedBytes: UInt64, residentBytes: UInt64) {
        self.memoryBytes = memoryBytes; self.targetBytes = targetBytes; self.balloonBytes = balloonBytes
        self.reportedBytes = reportedBytes; self.residentBytes = residentBytes
    }
}

extension Machine {
    /// The balloon's view of the running machine's memory; nil when it has no balloon device.
    public func memoryStatus() throws(SwiftletError) -> MemoryStatus? {
        let machine = try liveMachine()
        guard let balloon = machine.devices.balloon else { return nil }
        let page = VirtioBalloon.pageSize
        let total = machine.memory.totalSize
        return MemoryStatus(memoryBytes: total,
                            targetBytes: total - min(total, UInt64(balloon.targetPages) * page),
                            balloonBytes: UInt64(balloon.actualPages) * page,
                            reportedBytes: balloon.counters.bytesReported,
                            residentBytes: UInt64(machine.memory.residentBytes))
    }

    /// Asks the running guest to keep only `bytes` of its memory (rounded down to whole 4 KiB
    /// pages): the balloon takes the rest and the host gets it back. The guest follows in its own
    /// time (`memoryStatus().balloonBytes`); under memory pressure it may take pages back. The
    /// machine's full memory (`bytes` at or above it) gives everything back.
    public func setMemoryTarget(bytes: UInt64) throws(SwiftletError) {
        try operations.withLock { _ throws(SwiftletError) in
            let machine = try liveMachine()
            guard let balloon = machine.devices.balloon else {
                throw SwiftletError(.unsupported, "the machine has no balloon device (it was started or restored without one)")
            }
            guard !machine.controller.isPaused else { throw SwiftletError(.invalidArgument, "the machine is paused: resume it first") }
            let total = machine.memory.totalSize
            guard bytes >= UInt64(MachineConfig.minimumMemoryMiB) << 20 else {
                throw SwiftletError(.invalidArgument, "a memory target of \(bytes >> 20) MiB is below the \(MachineConfig.minimumMemoryMiB) MiB a guest needs")
            }
            let pages = (total - min(total, bytes)) / VirtioBalloon.pageSize
            balloon.setTarget(pages: UInt32(clamping: pages))
        }
    }
}
