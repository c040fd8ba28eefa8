import CLinux
import Glibc
import Hypervisor
import SwiftletSystem

extension VirtualMachine {
    private func ioctl(_ name: String, _ request: UInt, _ arg: UnsafeMutableRawPointer) throws(SwiftletError) {
        let fd = descriptor.rawValue
        try systemCall("\(name) failed") { swiftlet_ioctl_ptr(fd, request, arg) }
    }

    /// Reads the interrupt controllers, the PIT (if `hasPIT`) and the clock. The vCPUs must be out of KVM_RUN.
    public func saveState(hasPIT: Bool) throws(SwiftletError) -> VMState {
        var chips: [[UInt8]] = []
        for id in UInt32(0)...2 {
            var chip = kvm_irqchip()
            chip.chip_id = id
            try ioctl("KVM_GET_IRQCHIP(\(id))", SWIFTLET_KVM_GET_IRQCHIP, &chip)
            chips.append(withUnsafeBytes(of: chip) { Array($0) })
        }
        var pit: [UInt8]?
        if hasPIT {
            var state = kvm_pit_state2()
            try ioctl("KVM_GET_PIT2", SWIFTLET_KVM_GET_PIT2, &state)
            pit = withUnsafeBytes(of: state) { Array($0) }
        }
        var clock = kvm_clock_data()
        try ioctl("KVM_GET_CLOCK", SWIFTLET_KVM_GET_CLOCK, &clock)
        let hasRealtime = clock.flags & UInt32(KVM_CLOCK_REALTIME) != 0
        return VMState(interruptControllers: chips, pit: pit, clock: clock.clock,
                       clockRealtime: hasRealtime ? clock.realtime : nil)
    }

    /// How long ago (host CLOCK_REALTIME, ns) `state` was saved, when it recorded the time: what
    /// `restoreState(_:advanceClock:)` moves the guest's clock on by, and so what its vCPUs' TSCs
    /// must move on by (`VCPU.restoreState(_:advancingTSCBy:)`). Zero if unknown or in the future.
    public func timeSinceSave(_ state: VMState) -> UInt64 {
        guard let saved = state.clockRealtime else { return 0 }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let current = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
        return current > saved ? current - saved : 0
    }

    /// Puts back a state saved by `saveState`, before any vCPU runs. With `advanceClock`, the guest's
    /// clock moves on by the host wall-clock time since the save (KVM does this itself when the
    /// save recorded CLOCK_REALTIME), so the guest's wall clock is right after a restore.
    public func restoreState(_ state: VMState, advanceClock: Bool) throws(SwiftletError) {
        guard state.interruptControllers.count == 3 else {
            throw SwiftletError(.invalidFormat, "saved VM state has \(state.interruptControllers.count) interrupt controllers, expected 3")
        }
        for (id, bytes) in state.interruptControllers.enumerated() {
            var chip = try Self.value(kvm_irqchip(), from: bytes, "interrupt controller \(id)")
            guard chip.chip_id == UInt32(id) else {
                throw SwiftletError(.invalidFormat, "saved interrupt controller \(id) says it is chip \(chip.chip_id)")
            }
            try ioctl("KVM_SET_IRQCHIP(\(id))", SWIFTLET_KVM_SET_IRQCHIP, &chip)
        }
        if let bytes = state.pit {
            var pit = try Self.value(kvm_pit_state2(), from: bytes, "PIT")
            try ioctl("KVM_SET_PIT2", SWIFTLET_KVM_SET_PIT2, &pit)
        }
        var clock = kvm_clock_data()
        clock.clock = state.clock
        if advanceClock, let realtime = state.clockRealtime {
            clock.flags = UInt32(KVM_CLOCK_REALTIME)
            clock.realtime = realtime
        }
        try ioctl("KVM_SET_CLOCK", SWIFTLET_KVM_SET_CLOCK, &clock)
    }

    static func value<T>(_ initial: T, from bytes: [UInt8], _ what: String) throws(SwiftletError) -> T {
        guard bytes.count == MemoryLayout<T>.size else {
            throw SwiftletError(.invalidFormat, "saved \(what) state is \(bytes.count) bytes, this host's KVM wants \(MemoryLayout<T>.size)")
        }
        var value = initial
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
        return value
    }

    /// The pages of memory slot `slot` (of `pageCount` 4 KiB pages) written since the last call, as
    /// a bitmap (bit i of word i/64 = page i), and clears the log. The slot must log dirty pages.
    public func dirtyPages(slot: UInt32, pageCount: Int) throws(SwiftletError) -> [UInt64] {
        let words = (pageCount + 63) / 64
        let buffer = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(1, words))
        defer { buffer.deallocate() }
        buffer.initialize(repeating: 0)
        var log = kvm_dirty_log()
        log.slot = slot
        // SAFETY: KVM writes one bit per page of the slot, which the buffer holds (rounded up to 64 bits).
        log.dirty_bitmap = UnsafeMutableRawPointer(buffer.baseAddress)
        try ioctl("KVM_GET_DIRTY_LOG(slot \(slot))", SWIFTLET_KVM_GET_DIRTY_LOG, &log)
        let bitmap = Array(buffer.prefix(words))
        return bitmap
    }
}

extension VCPU {
    /// Tells the guest's kvmclock that the vCPU was stopped (for a while), so its soft-lockup
    /// watchdog does not fire after a pause. False when the guest does not use kvmclock.
    @discardableResult
    public func notifyClockPaused() -> Bool {
        swiftlet_ioctl_int(descriptor.rawValue, SWIFTLET_KVM_KVMCLOCK_CTRL, 0) == 0
    }
}
