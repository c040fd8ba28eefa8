import GuestMemory
import Synchronization
import SwiftletSystem
import Virtio

/// A virtio entropy device (virtio 1.2, section 5.4): fills every buffer the guest offers with
/// bytes from the host's kernel CSPRNG (getrandom), so the guest's RNG is seeded from its first
/// second instead of from timer jitter.
public final class VirtioRNG: SingleQueueDevice {
    public static let queueSize: UInt16 = 256
    /// The most bytes one request (chain) gets.
    public static let maximumBytesPerRequest: UInt64 = 64 << 10

    public let requestQueue: DeviceQueue
    private let onError: @Sendable (SwiftletError) -> Void
    /// Where the bytes come from (tests substitute a failing source).
    private let fill: @Sendable (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Void

    public init(onError: @escaping @Sendable (SwiftletError) -> Void = { _ in },
                fill: @escaping @Sendable (UnsafeMutableRawBufferPointer) throws(SwiftletError) -> Void = SystemRandom.fill) {
        self.onError = onError
        self.fill = fill
        self.requestQueue = DeviceQueue(name: "virtio-rng", onError: onError)
    }

    public var deviceType: VirtioDeviceType { .entropy }
    public var offeredFeatures: UInt64 { VirtioFeature.version1 | VirtioFeature.indirectDescriptors }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize] }
    public func readConfiguration(offset: Int, into data: UnsafeMutableRawBufferPointer) {}
    public func writeConfiguration(offset: Int, data: UnsafeRawBufferPointer) {}

    /// Fills the chain's writable buffers, at most `maximumBytesPerRequest` of them; returns how
    /// many bytes were filled. A chain may describe gigabytes (every descriptor can point at the
    /// same guest pages): the guest gets the first 64 KiB, as from other VMMs, and asks again.
    public func serve(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        var written: UInt64 = 0
        for buffer in DescriptorChain.segments(chain.writable, skipping: 0, keeping: Self.maximumBytesPerRequest) {
            do throws(SwiftletError) {
                let p = try memory.hostPointer(forWriting: buffer.address, length: buffer.length)
                // SAFETY: hostPointer checked that the buffer lies in guest memory.
                try fill(UnsafeMutableRawBufferPointer(start: p, count: Int(buffer.length)))
                written += buffer.length
            } catch {
                // Hand back what was filled; never pass unfilled bytes off as entropy.
                onError(SwiftletError(error.code, "virtio-rng: \(error.message)", cause: error.cause))
                break
            }
        }
        return UInt32(written)
    }
}
