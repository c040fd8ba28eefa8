import Virtio
import Synchronization
import MachineState
import Testing
@testable import Devices

final class RecordingSink: ByteSink {
    let bytes = Mutex<[UInt8]>([])
    func write(_ byte: UInt8) { bytes.withLock { $0.append(byte) } }
    var text: String { String(decoding: bytes.withLock { $0 }, as: UTF8.self) }
}

final class RecordingLine: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ asserted: Bool) { levels.withLock { $0.append(asserted) } }
    var history: [Bool] { levels.withLock { $0 } }
    var asserted: Bool { history.last ?? false }
}

extension PortIODevice {
    func out(_ offset: UInt16, _ value: UInt8) {
        [value].withUnsafeBytes { write(offset: offset, data: $0) }
    }
    func inb(_ offset: UInt16) -> UInt8 {
        var value: [UInt8] = [0]
        value.withUnsafeMutableBytes { read(offset: offset, into: $0) }
        return value[0]
    }
}

@Suite struct Serial8250Tests {
    let sink = RecordingSink()
    let line = RecordingLine()
    var uart: Serial8250 { Serial8250(output: sink, interrupt: line) }

    @Test func passesLinuxAutoconfigAs16550A() {
        let uart = self.uart
        // Scratch register and IER read back.
        uart.out(7, 0xA5); #expect(uart.inb(7) == 0xA5)
        uart.out(1, 0x0F); #expect(uart.inb(1) == 0x0F)
        uart.out(1, 0)
        // Loopback: MCR = LOOP | OUT2 | RTS gives MSR = DCD | CTS.
        uart.out(4, 0x10 | 0x0A)
        #expect(uart.inb(6) & 0xF0 == 0x90)
        uart.out(4, 0x08)
        #expect(uart.inb(6) & 0xF0 == 0xB0)
        // FIFO enabled shows in IIR bits 7:6.
        uart.out(2, 0x07)
        #expect(uart.inb(2) & 0xC0 == 0xC0)
    }

    @Test func transmitsToTheSinkAndStaysEmpty() {
        let uart = self.uart
        for b in "hi\n".utf8 { uart.out(0, b) }
        #expect(sink.text == "hi\n")
        #expect(uart.inb(5) & 0x60 == 0x60) // THRE | TEMT
    }

    @Test func divisorLatchDoesNotTransmit() {
        let uart = self.uart
        uart.out(3, 0x80)         // DLAB
        uart.out(0, 0x01); uart.out(1, 0x00)
        #expect(uart.inb(0) == 0x01)
        uart.out(3, 0x03)
        #expect(sink.text.isEmpty)
    }

    @Test func transmitEmptyInterruptOnEnableAndAcknowledgedByIIR() {
        let uart = self.uart
        uart.out(1, 0x02)                     // ETBEI
        #expect(line.asserted)
        #expect(uart.inb(2) & 0x0F == 0x02)   // THRE pending; reading acknowledges
        #expect(!line.asserted)
        #expect(uart.inb(2) & 0x0F == 0x01)   // nothing pending
        uart.out(0, UInt8(ascii: "x"))       // THR empties at once: a new interrupt (edge)
        #expect(line.history.suffix(2) == [false, true])
    }

    @Test func receivedBytesRaiseDataReady() {
        let uart = self.uart
        uart.out(4, 0x0B)                     // DTR | RTS | OUT2: the port is open
        uart.out(1, 0x01)                     // ERBFI
        uart.receive(Array("ab".utf8))
        #expect(line.asserted)
        #expect(uart.inb(5) & 0x01 == 0x01)
        #expect(uart.inb(2) & 0x0F == 0x04)
        #expect(uart.inb(0) == UInt8(ascii: "a"))
        #expect(uart.inb(0) == UInt8(ascii: "b"))
        #expect(uart.inb(5) & 0x01 == 0)
        #expect(!line.asserted)
    }

    @Test func inputWaitsUntilTheGuestListens() {
        let uart = self.uart
        uart.receive(Array("early".utf8))
        // Boot-time console set-up and probing (as Linux does them): DTR, the IER scratch test,
        // the loopback test, FIFO resets, RBR reads.
        uart.out(4, 0x01)
        uart.out(1, 0x0F); uart.out(1, 0x00)
        uart.out(4, 0x1A); uart.out(4, 0x01)
        uart.out(2, 0x07)
        #expect(uart.inb(5) & 0x01 == 0)
        _ = uart.inb(0)
        // The port is opened: OUT2 on (interrupt output), then receive interrupts on.
        uart.out(4, 0x09)
        #expect(!line.asserted)
        uart.out(1, 0x05)
        #expect(line.asserted)
        #expect((0..<5).map { _ in uart.inb(0) } == Array("early".utf8))
    }

    @Test func loopbackKeepsSixteenBytesAndReportsTheOverrun() {
        let uart = self.uart
        uart.out(4, 0x10)
        for i in 0..<10_000 { uart.out(0, UInt8(truncatingIfNeeded: i)) }
        #expect(uart.state.pendingInput.count == 16)
        #expect(uart.inb(5) & 0x03 == 0x03)  // data ready, overrun
        #expect(uart.inb(5) & 0x02 == 0)     // reading LSR clears the overrun
        #expect((0..<16).map { _ in uart.inb(0) } == (0..<16).map { UInt8($0) })
        #expect(uart.inb(5) & 0x01 == 0)
        #expect(sink.text.isEmpty)
    }

    @Test func anOverrunTheGuestHasNotReadSurvivesASnapshot() throws {
        let uart = self.uart
        uart.out(4, 0x10)
        for i in 0..<20 { uart.out(0, UInt8(i)) }
        let saved = uart.state
        #expect(saved.overrun == true)
        let other = Serial8250(output: RecordingSink(), interrupt: RecordingLine())
        other.restore(try StateFile.decode(SerialState.self, from: try StateFile.encode(saved), path: "state"))
        #expect(other.inb(5) & 0x02 == 0x02, "the restored LSR still reports the overrun")
        #expect(other.inb(5) & 0x02 == 0 && other.state.overrun == false, "and reading LSR clears it")
        // A state written before the flag was kept restores as no overrun.
        var old = saved
        old.overrun = nil
        other.restore(old)
        #expect(other.inb(5) & 0x02 == 0)
    }

    @Test func loopbackDivertsTransmitToReceive() {
        let uart = self.uart
        uart.out(4, 0x10)
        uart.out(1, 0x01)
        uart.out(0, 0x55)
        #expect(sink.text.isEmpty)
        #expect(uart.inb(0) == 0x55)
    }

    @Test func stateRoundTrips() {
        let uart = self.uart
        uart.out(3, 0x80); uart.out(0, 0x03); uart.out(3, 0x1B); uart.out(7, 0x42); uart.out(4, 0x0B); uart.out(1, 0x01)
        uart.receive([1, 2, 3])
        _ = uart.inb(0)
        let saved = uart.state
        let other = Serial8250(output: RecordingSink(), interrupt: RecordingLine())
        other.restore(saved)
        #expect(other.state == saved)
        #expect(other.inb(0) == 2)
        #expect(saved.divisorLow == 3 && saved.lineControl == 0x1B && saved.scratch == 0x42)
    }
}

@Suite struct SmallDeviceTests {
    @Test func i8042ResetsOnlyOnCommand0xFE() {
        let resets = Mutex(0)
        let kbd = I8042 { resets.withLock { $0 += 1 } }
        kbd.out(4, 0xAA)
        kbd.out(0, 0xFE)
        #expect(resets.withLock { $0 } == 0)
        #expect(kbd.inb(4) == 0)
        kbd.out(4, 0xFE)
        #expect(resets.withLock { $0 } == 1)
    }

    @Test func bootMarkerOnlyFiresOnTheMagicValue() {
        let times = Mutex<[UInt64]>([])
        let marker = BootMarker { t in times.withLock { $0.append(t) } }
        marker.out(0, 1)
        #expect(times.withLock { $0 }.isEmpty)
        marker.out(0, 123)
        #expect(times.withLock { $0 }.count == 1)
        #expect(times.withLock { $0 }[0] > 0)
    }

    @Test func pvpanicAdvertisesAndReportsEvents() {
        let events = Mutex<[UInt8]>([])
        let device = PVPanic { e in events.withLock { $0.append(e) } }
        #expect(device.inb(0) == 0x03)
        device.out(0, 0)
        device.out(0, 1)
        #expect(events.withLock { $0 } == [1])
    }

    @Test func sleepControlPowersOffOnlyForS5WithSleepEnable() {
        let offs = Mutex(0)
        let device = ACPISleepControl(softOffType: 5) { offs.withLock { $0 += 1 } }
        device.out(0, 5 << 2)          // no SLP_EN
        device.out(0, (3 << 2) | 0x20) // S3
        #expect(offs.withLock { $0 } == 0)
        device.out(0, (5 << 2) | 0x20)
        #expect(offs.withLock { $0 } == 1)
    }
}
