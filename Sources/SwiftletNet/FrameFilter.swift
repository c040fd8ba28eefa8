/// What a frame filter decides about one Ethernet frame.
public enum FilterVerdict: Sendable, Equatable {
    /// Let the frame through unchanged.
    case pass
    /// Drop the frame silently.
    case drop
    /// Drop the frame and hand the guest these frames instead (a TCP reset, an ICMP unreachable,
    /// a DNS answer made on the host). Only for frames the guest sent.
    case reply([[UInt8]])
}

/// A component that sits between a guest's network device and the network behind it (passt) and
/// decides, frame by frame, what may pass. It sees every frame in both directions: the frames the
/// guest sends (`outbound`) and those on their way to the guest (`inbound`, where it may learn,
/// e.g. the addresses in a DNS answer for an allowed name). The device calls it from its own
/// threads (outbound frames on the vCPU thread that notified, inbound ones on the device's
/// thread), so an implementation guards its state.
///
/// A frame is hostile input: any length (zero included), any contents. A filter never traps on
/// one: a frame it cannot make sense of is dropped.
public protocol FrameFilter: AnyObject, Sendable {
    func outbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict
    func inbound(_ frame: UnsafeRawBufferPointer) -> FilterVerdict
}
