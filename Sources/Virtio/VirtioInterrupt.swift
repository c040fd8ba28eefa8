import Synchronization

/// The transport's interrupt status register and the level-triggered line it drives: the line
/// is high while any status bit is set, and drops when the driver acknowledges the last one.
public final class VirtioInterrupt: Sendable {
    public static let usedBuffer: UInt32 = 1
    public static let configurationChange: UInt32 = 2

    private let state = Mutex<UInt32>(0)
    private let line: any InterruptLine

    public init(line: any InterruptLine) {
        self.line = line
    }

    /// The status bits the driver has not acknowledged yet.
    public var status: UInt32 { state.withLock { $0 } }

    /// Tells the driver that a queue has used buffers.
    public func signalUsedBuffer() { raise(Self.usedBuffer) }

    /// Tells the driver that the configuration space changed.
    public func signalConfigurationChange() { raise(Self.configurationChange) }

    private func raise(_ bit: UInt32) {
        // The line is set under the lock so a concurrent acknowledge cannot reorder high and low.
        state.withLock { s in
            s |= bit
            line.setLevel(true)
        }
    }

    /// The driver acknowledged `bits` (InterruptACK).
    func acknowledge(_ bits: UInt32) {
        state.withLock { s in
            let before = s
            s &= ~bits
            if before != 0 && s == 0 { line.setLevel(false) }
        }
    }

    /// Puts back saved status bits (the interrupt controller's own state carries the line's level).
    public func restore(_ bits: UInt32) {
        state.withLock { $0 = bits }
    }

    func reset() {
        state.withLock { s in
            if s != 0 { line.setLevel(false) }
            s = 0
        }
    }
}
