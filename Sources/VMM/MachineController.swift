import Hypervisor
import Synchronization
import SwiftletSystem

/// Decides when the machine stops, and why: the first reason reported wins; every vCPU is then
/// knocked out of its run (KVM_RUN).
final class MachineController: Sendable {
    private struct State {
        var exit: MachineExit?
        var vcpus: [(any HypervisorVCPU, OSThread?)] = []
        var markerTime: UInt64?
        var warnings: [String] = []
    }
    private let state = Mutex(State())
    private let stopped = Atomic<Bool>(false)
    private let done = Mutex<Bool>(false)
    private let wake: EventFD

    /// Pausing: requested by `pause()`, acknowledged by each vCPU thread as it parks.
    private struct PauseState {
        var requested = false
        var parked = 0
        var stopping = false
    }
    private let pauseState = ConditionLock(PauseState())

    init() throws(SwiftletError) {
        wake = try EventFD(nonBlocking: false)
    }

    var isStopping: Bool { stopped.load(ordering: .acquiring) }

    /// The exit descriptor: readable once the machine has stopped.
    var stopEventDescriptor: Int32 { wake.rawValue }

    func attach(_ vcpu: any HypervisorVCPU, thread: OSThread?) {
        state.withLock { $0.vcpus.append((vcpu, thread)) }
    }

    func setThread(_ thread: OSThread, for vcpu: any HypervisorVCPU) {
        state.withLock { s in
            if let i = s.vcpus.firstIndex(where: { $0.0 === vcpu }) { s.vcpus[i].1 = thread }
        }
        // A pause requested before the thread was recorded sent it no signal, and it may be in
        // KVM_RUN already (a halted guest CPU would then never come out): `pause` sets `requested`
        // before it reads the threads, so one of the two signals it.
        if pauseState.withLock({ $0.requested }) {
            vcpu.requestExit()
            thread.interrupt()
        }
    }

    /// Records the reason (if none yet) and stops every vCPU.
    func stop(_ reason: MachineExit) {
        let targets = state.withLock { s -> [(any HypervisorVCPU, OSThread?)] in
            if s.exit == nil { s.exit = reason }
            return s.vcpus
        }
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        pauseState.withLock { $0.stopping = true } // parked vCPUs wake up and leave
        for (vcpu, thread) in targets {
            vcpu.requestExit()
            thread?.interrupt()
        }
        wake.signal()
    }

    enum PauseOutcome {
        case paused
        /// The machine stopped (or was stopping) instead.
        case stopped
        /// Some vCPU did not park in time (its thread is stuck in a device); the pause was undone.
        case timedOut
    }

    /// Stops every vCPU outside KVM_RUN and waits until all have parked. In-flight port and MMIO
    /// accesses are completed first (KVM finishes them on the KVM_RUN that sees the exit request),
    /// so the saved registers are between two instructions.
    func pause(timeoutNanoseconds: UInt64 = 10_000_000_000) -> PauseOutcome {
        pauseState.withLock { $0.requested = true }
        let targets = state.withLock { $0.vcpus }
        for (vcpu, thread) in targets {
            vcpu.requestExit()
            thread?.interrupt()
        }
        let count = targets.count
        let stopping = pauseState.wait(until: { $0.parked == count || $0.stopping }, timeoutNanoseconds: timeoutNanoseconds) { $0.stopping }
        switch stopping {
        case false?: return .paused
        case true?: return .stopped
        case nil:
            // Not every vCPU is out of KVM_RUN: calling into one that is would wait for it.
            resume(notifyingClocks: false)
            return .timedOut
        }
    }

    /// Lets parked vCPUs run again, telling the guest's kvmclock that they were stopped.
    func resume(notifyingClocks: Bool = true) {
        let targets = state.withLock { $0.vcpus }
        pauseState.withLock { p in
            for (vcpu, _) in targets {
                vcpu.clearExitRequest()
                if notifyingClocks { vcpu.notifyClockPaused() }
            }
            p.requested = false
        }
    }

    var isPaused: Bool { pauseState.withLock { $0.requested } }

    /// Called by a vCPU thread when KVM_RUN returned because an exit was requested: parks the
    /// thread while the machine is paused.
    func parkIfPaused() {
        let mustPark = pauseState.withLock { p -> Bool in
            guard p.requested, !p.stopping else { return false }
            p.parked += 1
            return true
        }
        guard mustPark else { return }
        _ = pauseState.wait(until: { !$0.requested || $0.stopping }) { $0.parked -= 1 }
    }

    var exit: MachineExit? { state.withLock { $0.exit } }

    /// Forgets the vCPUs and their threads once they have ended (they hold the devices, whose
    /// callbacks hold this controller).
    func detachAll() {
        state.withLock { $0.vcpus.removeAll() }
    }

    func recordMarker(_ time: UInt64) {
        state.withLock { if $0.markerTime == nil { $0.markerTime = time } }
    }

    var markerTime: UInt64? { state.withLock { $0.markerTime } }

    /// Keeps a device's complaint for the run report (the first 100; a broken guest could repeat one forever).
    func warn(_ message: String) {
        state.withLock { if $0.warnings.count < 100 { $0.warnings.append(message) } }
    }

    var warnings: [String] { state.withLock { $0.warnings } }
}
