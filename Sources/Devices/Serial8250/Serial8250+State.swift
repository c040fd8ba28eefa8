/// A serial port's guest-visible state, as a plain value (for snapshots).
public struct SerialState: Codable, Sendable, Equatable {
    public var divisorLow: UInt8
    public var divisorHigh: UInt8
    public var interruptEnable: UInt8
    public var fifoControl: UInt8
    public var lineControl: UInt8
    public var modemControl: UInt8
    public var scratch: UInt8
    public var transmitEmptyPending: Bool
    public var pendingInput: [UInt8]
    public var lineAsserted: Bool
    /// A byte was lost to a full receive FIFO and LSR has not been read since (its OE bit).
    /// Optional so that states written before it was kept still read (as no overrun).
    public var overrun: Bool? = nil

    /// A port as after reset: nothing programmed, nothing pending.
    public static let reset = SerialState(divisorLow: 0, divisorHigh: 0, interruptEnable: 0, fifoControl: 0, lineControl: 0,
                                          modemControl: 0, scratch: 0, transmitEmptyPending: false, pendingInput: [],
                                          lineAsserted: false)
}

extension Serial8250 {
    /// The current state.
    public var state: SerialState {
        registers.withLock { r in
            SerialState(divisorLow: r.divisorLow, divisorHigh: r.divisorHigh, interruptEnable: r.interruptEnable,
                        fifoControl: r.fifoControl, lineControl: r.lineControl, modemControl: r.modemControl,
                        scratch: r.scratch, transmitEmptyPending: r.transmitEmptyPending,
                        pendingInput: Array(r.receive[r.receiveHead...]) + r.backlog, lineAsserted: r.lineAsserted,
                        overrun: r.overrun)
        }
    }

    /// Puts back a saved state (the interrupt controller's own state carries the line level).
    public func restore(_ s: SerialState) {
        registers.withLock { r in
            r = Registers(divisorLow: s.divisorLow, divisorHigh: s.divisorHigh, interruptEnable: s.interruptEnable,
                          fifoControl: s.fifoControl, lineControl: s.lineControl, modemControl: s.modemControl,
                          scratch: s.scratch, transmitEmptyPending: s.transmitEmptyPending, receive: [],
                          receiveHead: 0, lineAsserted: s.lineAsserted, backlog: s.pendingInput)
            r.overrun = s.overrun ?? false
            r.admitBacklog()
        }
    }
}
