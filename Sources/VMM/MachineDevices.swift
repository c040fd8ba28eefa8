import Devices
import LinuxBoot
import SwiftletSystem
import Virtio

/// A device's stable name within its machine: its kind and its place among the devices of that
/// kind (`serial0`, `virtio-blk1`, `virtio-vsock0`). Snapshot state is keyed by it, so adding a
/// device of another kind never shifts which state goes to which device.
public struct DeviceID: Hashable, Sendable, CustomStringConvertible {
    public let kind: String
    public let index: Int

    public init(kind: String, index: Int) {
        self.kind = kind; self.index = index
    }

    public var description: String { kind + String(index) }
}

/// One device's saved state: exactly one of the fields is set, for the device's kind (a virtio-fs
/// device: `virtio` and `fileServer`).
public struct DeviceState: Codable, Sendable, Equatable {
    public var serial: SerialState?
    public var virtio: VirtioTransportState?
    /// A virtio-fs device's file server (with `virtio`, its transport and queues).
    public var fileServer: FileServerState? = nil

    public init(serial: SerialState? = nil, virtio: VirtioTransportState? = nil, fileServer: FileServerState? = nil) {
        self.serial = serial; self.virtio = virtio; self.fileServer = fileServer
    }
}

/// The contract every device of a machine keeps for snapshots: its state as a plain value, and
/// that value put back before the guest runs again. Called while the machine is paused (save)
/// or not yet running (restore).
protocol Snapshottable: AnyObject, Sendable {
    func saveDeviceState() throws(SwiftletError) -> DeviceState
    func restoreDeviceState(_ state: DeviceState, id: DeviceID) throws(SwiftletError)
}

extension Serial8250: Snapshottable {
    func saveDeviceState() -> DeviceState { DeviceState(serial: state) }

    func restoreDeviceState(_ saved: DeviceState, id: DeviceID) throws(SwiftletError) {
        guard let serial = saved.serial, saved.virtio == nil else {
            throw SwiftletError(.invalidFormat, "the saved state of \(id) is not a serial port's")
        }
        restore(serial)
    }
}

extension VirtioMMIOTransport: Snapshottable {
    func saveDeviceState() throws(SwiftletError) -> DeviceState { DeviceState(virtio: try saveState()) }

    func restoreDeviceState(_ saved: DeviceState, id: DeviceID) throws(SwiftletError) {
        guard let virtio = saved.virtio, saved.serial == nil, saved.fileServer == nil else {
            throw SwiftletError(.invalidFormat, "the saved state of \(id) is not a virtio device's")
        }
        do { try restoreState(virtio) } catch {
            throw SwiftletError(error.code, "\(id): \(error.message)")
        }
    }
}

/// A virtio-fs device and its transport: the file server's tables are saved beside the
/// transport's state, and put back before the device serves again.
final class FileSystemSlot: Snapshottable {
    let device: VirtioFS
    let transport: VirtioMMIOTransport
    let warn: @Sendable (String) -> Void

    init(device: VirtioFS, transport: VirtioMMIOTransport, warn: @escaping @Sendable (String) -> Void) {
        self.device = device; self.transport = transport; self.warn = warn
    }

    func saveDeviceState() throws(SwiftletError) -> DeviceState {
        DeviceState(virtio: try transport.saveState(), fileServer: device.server.saveState())
    }

    func restoreDeviceState(_ saved: DeviceState, id: DeviceID) throws(SwiftletError) {
        guard let virtio = saved.virtio, let fileServer = saved.fileServer, saved.serial == nil else {
            throw SwiftletError(.invalidFormat, "the saved state of \(id) is not a virtio-fs device's")
        }
        do throws(SwiftletError) {
            let losses = try device.server.restore(fileServer)
            if losses.nodes + losses.handles > 0 {
                warn("virtio-fs: \(losses.nodes) files and \(losses.handles) open files the guest held are gone from the shared directories (or no longer open as they were): the guest gets ESTALE and EBADF for them")
            }
            try transport.restoreState(virtio)
        } catch {
            throw SwiftletError(error.code, "\(id): \(error.message)")
        }
    }
}

/// A machine's devices, as the shared assembly step makes them for boot and restore alike: the
/// port and MMIO buses, the virtio devices on their transports, and every device by its id.
struct MachineDevices: Sendable {
    /// A virtio block device in its drive slot.
    struct Drive: Sendable {
        let id: DeviceID
        let device: VirtioBlock
        let transport: VirtioMMIOTransport
    }

    var ports = PortIOBus()
    var mmio = MMIOBus()
    let serial: Serial8250
    private(set) var drives: [Drive] = []
    private(set) var transports: [VirtioMMIOTransport] = []
    private(set) var vsock: VirtioVsock?
    private(set) var network: VirtioNet?
    private(set) var balloon: VirtioBalloon?
    private(set) var fileSystem: VirtioFS?
    /// Every device whose state a snapshot holds, in the order they were made.
    private(set) var snapshottable: [(id: DeviceID, device: any Snapshottable)] = []
    /// The virtio devices' windows and interrupts, for the firmware tables.
    private(set) var virtioSlots: [VirtioMMIODescription] = []

    init(serial: Serial8250) {
        self.serial = serial
        snapshottable.append((DeviceID(kind: "serial", index: 0), serial))
    }

    /// The id the next device of `kind` gets.
    func nextID(_ kind: String) -> DeviceID {
        DeviceID(kind: kind, index: snapshottable.count(where: { $0.id.kind == kind }))
    }

    /// Puts a block device on the next virtio-mmio slot (see `attach`).
    mutating func attachDrive(_ device: VirtioBlock, makeTransport: TransportMaker) {
        let (id, transport) = attach(device, kind: "virtio-blk", makeTransport: makeTransport)
        drives.append(Drive(id: id, device: device, transport: transport))
    }

    mutating func attachVsock(_ device: VirtioVsock, makeTransport: TransportMaker) {
        attach(device, kind: "virtio-vsock", makeTransport: makeTransport)
        vsock = device
    }

    mutating func attachNetwork(_ device: VirtioNet, makeTransport: TransportMaker) {
        attach(device, kind: "virtio-net", makeTransport: makeTransport)
        network = device
    }

    mutating func attachBalloon(_ device: VirtioBalloon, makeTransport: TransportMaker) {
        attach(device, kind: "virtio-balloon", makeTransport: makeTransport)
        balloon = device
    }

    mutating func attachFileSystem(_ device: VirtioFS, makeTransport: TransportMaker, warn: @escaping @Sendable (String) -> Void) {
        // Saved with its file server's tables.
        attach(device, kind: "virtio-fs", makeTransport: makeTransport) { FileSystemSlot(device: device, transport: $0, warn: warn) }
        fileSystem = device
    }

    mutating func attachEntropy(_ device: VirtioRNG, makeTransport: TransportMaker) {
        attach(device, kind: "virtio-rng", makeTransport: makeTransport)
    }

    /// Makes the transport of a virtio device on a slot (its register window and GSI).
    typealias TransportMaker = (any VirtioDevice, VirtioMMIODescription) -> VirtioMMIOTransport

    /// Puts `device` behind a transport on the next free slot; its snapshot state is the
    /// transport's, or what `saved` makes of the transport.
    @discardableResult
    private mutating func attach(_ device: any VirtioDevice, kind: String, makeTransport: TransportMaker,
                                 saved: (VirtioMMIOTransport) -> any Snapshottable = { $0 }) -> (DeviceID, VirtioMMIOTransport) {
        let id = nextID(kind)
        let slot = Machine.virtioSlot(transports.count)
        let transport = makeTransport(device, slot)
        mmio.register(transport, base: slot.base, length: slot.size)
        transports.append(transport)
        virtioSlots.append(slot)
        snapshottable.append((id, saved(transport)))
        return (id, transport)
    }

    /// Tells every virtio device to stop serving (the machine is ending): a vCPU thread kept busy
    /// in a device by a guest that queues without end comes back, so the machine can end.
    func requestStop() {
        for transport in transports { transport.device.requestStop() }
    }

    /// Every device's state, by id.
    func saveStates() throws(SwiftletError) -> [String: DeviceState] {
        var states: [String: DeviceState] = [:]
        for (id, device) in snapshottable { states[id.description] = try device.saveDeviceState() }
        return states
    }

    /// Gives every device its saved state. The snapshot must hold a state for each device and
    /// none for a device this machine does not have; `what` names the snapshot in errors.
    func restoreStates(_ states: [String: DeviceState], from what: String) throws(SwiftletError) {
        let known = Set(snapshottable.map(\.id.description))
        if let unknown = states.keys.sorted().first(where: { !known.contains($0) }) {
            throw SwiftletError(.invalidFormat, "\(what) holds the state of a device \(unknown.debugDescription) that the machine does not have")
        }
        for (id, device) in snapshottable {
            guard let state = states[id.description] else {
                throw SwiftletError(.invalidFormat, "\(what) holds no state for the machine's device \(id)")
            }
            try device.restoreDeviceState(state, id: id)
        }
    }
}
