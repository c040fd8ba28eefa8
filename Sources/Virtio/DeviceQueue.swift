import GuestMemory
import Synchronization
import SwiftletSystem

/// One queue of an activated device, with the memory and interrupt it is served with. Devices
/// keep one per queue they serve; `serve` takes every available chain, hands it to the device's
/// handler, returns it to the driver and raises the interrupt if the driver wants one.
public final class DeviceQueue: Sendable {
    struct Live {
        var queue: Virtqueue
        let memory: GuestMemory
        let interrupt: VirtioInterrupt
    }
    private let live = Mutex<Live?>(nil)
    /// Set by `halt`: the queue is served no more, and a `serve` in progress ends at its next chain.
    private let halted = Atomic<Bool>(false)
    private let name: String
    private let onError: @Sendable (SwiftletError) -> Void

    /// `name` prefixes error reports ("virtio-blk disk0 queue 0").
    public init(name: String, onError: @escaping @Sendable (SwiftletError) -> Void) {
        self.name = name
        self.onError = onError
    }

    /// Starts serving queue `index` of `activation`; throws if the driver did not set it up.
    public func activate(_ activation: VirtioActivation, index: Int) throws(SwiftletError) {
        guard index < activation.queues.count, activation.queues[index].isReady else {
            throw SwiftletError(.invalidArgument, "\(name): the driver did not set up queue \(index)")
        }
        live.withLock { $0 = Live(queue: activation.queues[index], memory: activation.memory, interrupt: activation.interrupt) }
    }

    public func reset() {
        live.withLock { $0 = nil }
    }

    /// Stops serving for good (the machine is ending); callable from any thread, returns at once.
    /// A driver that keeps queueing chains cannot keep `serve`, and the vCPU thread in it, busy.
    public func halt() {
        halted.store(true, ordering: .releasing)
    }

    /// The queue as the device has it now (its ring positions included), or nil when it is not
    /// being served. For snapshots, taken while nothing serves it.
    public var current: Virtqueue? { live.withLock { $0?.queue } }

    /// Serves the queue. `handle` gets each chain and guest memory and returns the number of bytes
    /// it wrote into the chain. A ring the device cannot follow (a driver bug) is reported and the
    /// queue stops being served until the driver resets the device.
    public func serve(_ handle: (DescriptorChain, GuestMemory) -> UInt32) {
        let interrupt: VirtioInterrupt? = live.withLock { state in
            guard var s = state else { return nil }
            do throws(SwiftletError) {
                var used = false
                while !halted.load(ordering: .acquiring), let chain = try s.queue.next(memory: s.memory) {
                    let length = handle(chain, s.memory)
                    try s.queue.addUsed(head: chain.head, length: length, memory: s.memory)
                    used = true
                }
                var notify = false
                if used { notify = try s.queue.shouldInterrupt(memory: s.memory) }
                state = s
                return notify ? s.interrupt : nil
            } catch {
                onError(SwiftletError(error.code, "\(name): \(error.message)"))
                state = nil
                return nil
            }
        }
        interrupt?.signalUsedBuffer()
    }
}

/// A device with a single request queue (queue 0): activation, reset and notifications are the
/// same for all of them; the device says how to serve one chain.
public protocol SingleQueueDevice: VirtioDevice {
    var requestQueue: DeviceQueue { get }
    /// Serves one chain; returns the number of bytes written into its writable buffers.
    func serve(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32
}

extension SingleQueueDevice {
    public var servedQueues: [Virtqueue?]? { [requestQueue.current] }

    public func activate(_ activation: VirtioActivation) throws(SwiftletError) {
        try requestQueue.activate(activation, index: 0)
    }

    public func reset() {
        requestQueue.reset()
    }

    public func requestStop() {
        requestQueue.halt()
    }

    public func queueNotified(_ index: Int) {
        guard index == 0 else { return }
        requestQueue.serve { chain, memory in serve(chain, memory: memory) }
    }
}
