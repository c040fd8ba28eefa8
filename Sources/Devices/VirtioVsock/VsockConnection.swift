/// One stream between a guest port and a host port, and its flow-control counters
/// (virtio 1.2, section 5.10.6.3): the device never sends the guest more than the guest's
/// advertised buffer minus what it has not yet consumed, and tells the guest how much of its
/// data has reached the host so the guest may send more.
struct VsockConnection {
    struct Key: Hashable {
        var hostPort: UInt32
        var guestPort: UInt32
    }

    /// The host end: a connected, non-blocking stream socket the device owns.
    let fd: Int32
    /// False while a host-initiated request waits for the guest's RESPONSE.
    var established: Bool
    /// When an unanswered host-initiated request is dropped (monotonic nanoseconds).
    var requestDeadline: UInt64?

    // The guest's receive window, from the last header it sent.
    var peerBufferAllocation: UInt32 = 0
    var peerForwardCount: UInt32 = 0
    /// Payload bytes sent to the guest (wrapping, like the guest's fwd_cnt).
    var sentToGuest: UInt32 = 0

    /// Guest bytes written to the host socket, and the value last told to the guest.
    var forwardCount: UInt32 = 0
    var advertisedForwardCount: UInt32 = 0
    /// Guest bytes the host socket has not taken yet (at most our buffer allocation).
    var pendingToHost: [UInt8] = []

    /// SHUTDOWN flags the guest sent.
    var guestShutdown: UInt32 = 0
    /// The host socket's write side was shut after the guest's SHUTDOWN(send).
    var hostWriteShut = false
    /// The host socket said it has data (or EOF) that has not been read yet.
    var hostReadable = false
    /// The host socket reached end of file: the guest was told SHUTDOWN(send).
    var hostEOF = false
    /// What the event loop is watching the socket for, and whether it is registered at all.
    var interest: UInt32 = 0
    var registered = false

    init(fd: Int32, established: Bool) {
        self.fd = fd
        self.established = established
    }

    /// How many more payload bytes the guest can take.
    var guestCredit: UInt32 {
        let inFlight = sentToGuest &- peerForwardCount
        return inFlight > peerBufferAllocation ? 0 : peerBufferAllocation - inFlight
    }

    /// Guest bytes received in all (written to the host or waiting).
    var receivedFromGuest: UInt32 { forwardCount &+ UInt32(truncatingIfNeeded: pendingToHost.count) }

    /// Whether the guest should hear about freed space: when its view of our free buffer has
    /// fallen below half.
    func needsCreditUpdate(bufferAllocation: UInt32) -> Bool {
        let guestView = bufferAllocation &- (receivedFromGuest &- advertisedForwardCount)
        return forwardCount != advertisedForwardCount && guestView < bufferAllocation / 2
    }

    /// Whether host data may flow to the guest now.
    var canSendToGuest: Bool {
        established && !hostEOF && guestShutdown & VsockHeader.shutdownReceive == 0
    }

    mutating func updatePeerCredit(_ header: VsockHeader) {
        peerBufferAllocation = header.bufferAllocation
        peerForwardCount = header.forwardCount
    }
}
