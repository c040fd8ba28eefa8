import Virtio
import Synchronization

/// A 16550A UART as the Linux 8250 driver expects at 0x3F8 (COM1): divisor latch, FIFO control,
/// scratch register, modem-control loopback, receive and transmit-empty interrupts.
///
/// Transmission is instantaneous: a byte written to THR goes straight to `output`, so the
/// transmitter is always empty. Input from the host waits in a backlog until the guest can take
/// it: the port's interrupt output enabled (MCR OUT2, which a PC's UART needs to reach the
/// interrupt controller and which Linux sets only when it opens the port) and the receive
/// interrupt on. So the driver's probing and start-up (IER scratch test, FIFO resets, RBR reads)
/// cannot eat early input. Then it moves to the receive queue the guest reads through RBR.
/// In loopback (MCR LOOP) transmitted bytes go to the receive FIFO instead, which holds 16 bytes
/// as the chip's does: more are lost and LSR reports an overrun.
public final class Serial8250: PortIODevice {
    // Register offsets.
    static let data = 0, interruptEnable = 1, interruptIdentification = 2, lineControl = 3
    static let modemControl = 4, lineStatus = 5, modemStatus = 6, scratch = 7

    // IER bits.
    static let ierReceivedData: UInt8 = 0x01
    static let ierTransmitEmpty: UInt8 = 0x02
    // IIR values.
    static let iirNone: UInt8 = 0x01
    static let iirTransmitEmpty: UInt8 = 0x02
    static let iirReceivedData: UInt8 = 0x04
    static let iirFIFOEnabled: UInt8 = 0xC0
    // LCR, MCR, LSR, MSR bits.
    static let lcrDivisorLatch: UInt8 = 0x80
    static let mcrInterruptOutput: UInt8 = 0x08 // OUT2
    static let mcrLoopback: UInt8 = 0x10
    static let lsrDataReady: UInt8 = 0x01
    static let lsrOverrun: UInt8 = 0x02
    static let lsrTransmitEmpty: UInt8 = 0x20 | 0x40 // THRE | TEMT
    static let msrIdle: UInt8 = 0xB0                  // DCD | DSR | CTS
    /// The 16550A's receive FIFO: what loopback can hold before bytes are lost.
    static let fifoSize = 16

    struct Registers {
        var divisorLow: UInt8 = 0x0C   // 9600 baud until the guest programs it
        var divisorHigh: UInt8 = 0
        var interruptEnable: UInt8 = 0
        var fifoControl: UInt8 = 0
        var lineControl: UInt8 = 0x03  // 8N1
        var modemControl: UInt8 = 0x08 // OUT2
        var scratch: UInt8 = 0
        var transmitEmptyPending = false
        var receive: [UInt8] = []
        var receiveHead = 0
        var lineAsserted = false
        /// A looped-back byte found the receive FIFO full and was lost (LSR OE, cleared when read).
        var overrun = false
        /// Host input the guest is not listening for yet.
        var backlog: [UInt8] = []

        var hasReceivedData: Bool { receiveHead < receive.count }
        var receivedCount: Int { receive.count - receiveHead }

        /// Hands the backlog to the guest once it listens: OUT2 up, receive interrupt on, no loopback.
        mutating func admitBacklog() {
            guard !backlog.isEmpty, interruptEnable & Serial8250.ierReceivedData != 0,
                  modemControl & Serial8250.mcrInterruptOutput != 0, modemControl & Serial8250.mcrLoopback == 0 else { return }
            receive.append(contentsOf: backlog)
            backlog.removeAll()
        }
    }

    let registers = Mutex(Registers())
    private let output: any ByteSink
    private let interrupt: any InterruptLine

    public init(output: any ByteSink, interrupt: any InterruptLine) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Queues bytes typed by the user for the guest to read.
    public func receive(_ bytes: some Sequence<UInt8>) {
        let level = registers.withLock { r -> Bool? in
            r.backlog.append(contentsOf: bytes)
            r.admitBacklog()
            return Self.updateLine(&r)
        }
        if let level { interrupt.setLevel(level) }
    }

    public func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        let (value, level) = registers.withLock { r -> (UInt8, Bool?) in
            let value = Self.readRegister(Int(offset), &r)
            return (value, Self.updateLine(&r))
        }
        data.fill(0)
        data[0] = value
        if let level { interrupt.setLevel(level) }
    }

    public func write(offset: UInt16, data: UnsafeRawBufferPointer) {
        let byte = data.firstByte
        let (transmit, level) = registers.withLock { r -> (UInt8?, Bool?) in
            let transmit = Self.writeRegister(Int(offset), byte, &r)
            return (transmit, Self.updateLine(&r))
        }
        if let transmit { output.write(transmit) }
        if let level { interrupt.setLevel(level) }
    }

    /// The highest-priority pending interrupt's IIR code, or `iirNone`.
    static func pendingInterrupt(_ r: Registers) -> UInt8 {
        if r.interruptEnable & ierReceivedData != 0 && r.hasReceivedData { return iirReceivedData }
        if r.interruptEnable & ierTransmitEmpty != 0 && r.transmitEmptyPending { return iirTransmitEmpty }
        return iirNone
    }

    /// Recomputes the interrupt output; returns the new level if it changed.
    static func updateLine(_ r: inout Registers) -> Bool? {
        let asserted = pendingInterrupt(r) != iirNone
        guard asserted != r.lineAsserted else { return nil }
        r.lineAsserted = asserted
        return asserted
    }

    static func readRegister(_ offset: Int, _ r: inout Registers) -> UInt8 {
        let latch = r.lineControl & lcrDivisorLatch != 0
        switch offset {
        case data where latch:
            return r.divisorLow
        case data:
            guard r.hasReceivedData else { return 0 }
            let byte = r.receive[r.receiveHead]
            r.receiveHead += 1
            if r.receiveHead == r.receive.count {
                r.receive.removeAll(keepingCapacity: true)
                r.receiveHead = 0
            }
            return byte
        case interruptEnable where latch:
            return r.divisorHigh
        case interruptEnable:
            return r.interruptEnable
        case interruptIdentification:
            let pending = pendingInterrupt(r)
            // Reading IIR acknowledges a transmit-empty interrupt.
            if pending == iirTransmitEmpty { r.transmitEmptyPending = false }
            return pending | (r.fifoControl & 0x01 != 0 ? iirFIFOEnabled : 0)
        case lineControl:
            return r.lineControl
        case modemControl:
            return r.modemControl
        case lineStatus:
            defer { r.overrun = false }
            return lsrTransmitEmpty | (r.hasReceivedData ? lsrDataReady : 0) | (r.overrun ? lsrOverrun : 0)
        case modemStatus:
            if r.modemControl & mcrLoopback != 0 {
                // Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
                let m = r.modemControl
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            return msrIdle
        case scratch:
            return r.scratch
        default:
            return 0xFF
        }
    }

    /// Applies a register write; returns a byte to transmit, if any.
    static func writeRegister(_ offset: Int, _ value: UInt8, _ r: inout Registers) -> UInt8? {
        let latch = r.lineControl & lcrDivisorLatch != 0
        switch offset {
        case data where latch:
            r.divisorLow = value
        case data:
            // The byte leaves at once, so THR is empty again: a new transmit-empty interrupt.
            r.transmitEmptyPending = true
            if r.modemControl & mcrLoopback != 0 {
                // Looped back into the receive FIFO; a full FIFO loses the byte, as the chip does.
                if r.receivedCount < fifoSize { r.receive.append(value) } else { r.overrun = true }
                return nil
            }
            return value
        case interruptEnable where latch:
            r.divisorHigh = value
        case interruptEnable:
            let enablingTransmit = value & ierTransmitEmpty != 0 && r.interruptEnable & ierTransmitEmpty == 0
            r.interruptEnable = value & 0x0F
            if enablingTransmit { r.transmitEmptyPending = true }
            r.admitBacklog()
        case interruptIdentification:
            r.fifoControl = value
            if value & 0x02 != 0 { // clear receive FIFO
                r.receive.removeAll(keepingCapacity: true)
                r.receiveHead = 0
            }
        case lineControl:
            r.lineControl = value
        case modemControl:
            r.modemControl = value & 0x1F
            r.admitBacklog()
        case scratch:
            r.scratch = value
        default:
            break
        }
        return nil
    }
}
