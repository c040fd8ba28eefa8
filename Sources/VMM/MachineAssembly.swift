import CLinux
import Devices
import Glibc
import GuestMemory
import Hypervisor
import LinuxBoot
import SwiftletNet
import SwiftletSystem
import Virtio

/// What both builders make the same way (`Machine.buildForBoot`, `Machine.buildFromSnapshot`):
/// the hypervisor checked, the VM with its interrupt controller, guest memory in its slots, and
/// the devices on their buses with their ids. A builder then loads a kernel or restores state.
struct AssembledMachine: Sendable {
    let hypervisor: any Hypervisor
    let vm: any HypervisorVM
    let memory: GuestMemory
    let devices: MachineDevices
    let console: ConsoleOutput
    /// The disks' sizes in bytes, in drive order.
    let diskSizes: [UInt64]
    let msrIndices: [UInt32]
    let supportedCPUID: [CPUIDEntry]

    /// Ends what runs beside the guest (the vsock and network devices' host sides, the file
    /// server's thread): the machine
    /// is done, or its build failed after this step.
    func tearDown() {
        devices.vsock?.stop()
        devices.network?.stop()
        devices.fileSystem?.requestStop()
    }
}

/// A machine ready to run: assembled, with its vCPUs created and set up.
struct BuiltMachine: Sendable {
    let parts: AssembledMachine
    let vcpus: [any HypervisorVCPU]
    let cpuid: [[CPUIDEntry]]
    let guestIsLinux: Bool
    /// Pages to copy in beside the starting guest (a restore's recorded working set).
    let prefetch: [Range<Int>]
}

extension Machine {
    /// Ports of the VMM's own devices.
    public enum Ports {
        public static let serial: UInt16 = 0x3F8
        public static let i8042: UInt16 = 0x60
        public static let bootMarker: UInt16 = BootMarker.port
        public static let pvpanic: UInt16 = 0x505
        public static let sleepControl: UInt16 = 0x600
    }
    /// COM1's interrupt.
    static let serialIRQ: UInt32 = 4
    /// The first GSI for virtio devices; each takes the next one.
    static let firstVirtioGSI: UInt32 = 5

    /// What the VMM cannot run a machine without.
    static let requiredFeatures: [HypervisorFeature] = [.interruptController, .userMemory, .extendedCPUID, .immediateExit]

    /// The shared assembly step, on `hypervisor` (opened by the builder; the shape is validated).
    /// `makeMemory` gives guest memory of the shape's layout (fresh, or mapped from a snapshot);
    /// with `logDirtyPages` the hypervisor logs the pages the guest writes.
    static func assemble(_ shape: MachineShape, hypervisor: any Hypervisor, controller: MachineController,
                         vsockPorts: (any VsockHostPorts)?, logDirtyPages: Bool, phases: inout [(name: String, end: UInt64)],
                         onBootMarker: (@Sendable (UInt64) -> Void)?,
                         makeMemory: ([(GuestAddress, UInt64)]) throws(SwiftletError) -> GuestMemory) throws(SwiftletError) -> AssembledMachine {
        try hypervisor.require(requiredFeatures)
        let msrIndices = try hypervisor.msrIndexList()
        let supportedCPUID = try hypervisor.supportedCPUID()
        let hostMemory = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        try shape.validate(maxVCPUs: min(hypervisor.maxVCPUs, MachineConfig.maximumCPUs), hostMemoryBytes: hostMemory)

        phases.append(("kvm", MonotonicClock.now))
        let vm = try hypervisor.createVirtualMachine()
        try vm.setTSSAddress(X86Layout.vmxTSS)
        try? vm.setIdentityMapAddress(X86Layout.vmxIdentityMap) // Intel only; harmless to skip elsewhere
        try vm.createInterruptController()

        phases.append(("vm", MonotonicClock.now))
        let memory = try makeMemory(X86Layout.ramRanges(bytes: UInt64(shape.memoryMiB) << 20))
        for (slot, region) in memory.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.start.rawValue, size: region.size, host: region.hostAddress,
                                   logDirtyPages: logDirtyPages, readOnly: false)
        }

        phases.append(("memory", MonotonicClock.now))
        let console = ConsoleOutput(fd: shape.consoleOutput)
        var devices = makeBus(vm: vm, console: console, controller: controller, onBootMarker: onBootMarker)
        let makeTransport = { (device: any VirtioDevice, slot: VirtioMMIODescription) -> VirtioMMIOTransport in
            VirtioMMIOTransport(device: device, memory: memory,
                                       interrupt: VirtioInterrupt(line: interruptLine(vm: vm, gsi: slot.gsi, controller: controller)),
                                       onError: { controller.warn($0.description) })
        }
        var diskSizes: [UInt64] = []
        for (index, disk) in shape.disks.enumerated() {
            let backend = try openDisk(disk)
            diskSizes.append(backend.byteCount)
            let device = VirtioBlock(backend: backend, readOnly: disk.readOnly, identifier: "swiftlet-disk\(index)",
                                     onError: { controller.warn($0.description) })
            devices.attachDrive(device, makeTransport: makeTransport)
        }
        if shape.entropyDevice {
            devices.attachEntropy(VirtioRNG(onError: { controller.warn($0.description) }), makeTransport: makeTransport)
        }
        if let vsock = shape.vsock {
            let ports = ChainedPorts(first: vsockPorts, then: UnixSocketPorts(forwards: vsock.forwards))
            let device = try VirtioVsock(guestCID: vsock.guestCID, hostPorts: ports, onError: { controller.warn($0.description) })
            devices.attachVsock(device, makeTransport: makeTransport)
        }
        if let network = shape.network {
            // The last slot: adding the NIC shifts no other device's slot or interrupt.
            do throws(SwiftletError) {
                let backend = try OwnedFileDescriptor.duplicate(network.backend, what: "the network device's socket")
                let log = network.log ?? { controller.warn("network: " + $0) }
                let filter = EgressFilter(configuration: network.policy, network: network.guest, log: log)
                let device = try VirtioNet(mac: network.guest.guestMAC, mtu: UInt16(network.guest.mtu), backend: backend, filter: filter,
                                           onError: { controller.warn($0.description) })
                devices.attachNetwork(device, makeTransport: makeTransport)
            } catch {
                devices.vsock?.stop()
                throw error
            }
        }
        if shape.balloon {
            // After every other device: snapshots of machines without one keep their slots.
            devices.attachBalloon(VirtioBalloon(onError: { controller.warn($0.description) }), makeTransport: makeTransport)
        }
        if !shape.volumes.isEmpty {
            // Last of all, like the balloon.
            do throws(SwiftletError) {
                devices.attachFileSystem(try VirtioFS(volumes: shape.volumes, onError: { controller.warn($0.description) }), makeTransport: makeTransport,
                                         warn: { controller.warn($0) })
            } catch {
                devices.vsock?.stop()
                devices.network?.stop()
                throw error
            }
        }
        return AssembledMachine(hypervisor: hypervisor, vm: vm, memory: memory, devices: devices, console: console, diskSizes: diskSizes,
                                msrIndices: msrIndices, supportedCPUID: supportedCPUID)
    }

    /// Where virtio device `index` lives: its register window and its GSI.
    static func virtioSlot(_ index: Int) -> VirtioMMIODescription {
        VirtioMMIODescription(base: X86Layout.virtioMMIOBase + UInt64(index) * VirtioMMIOTransport.windowSize,
                              size: VirtioMMIOTransport.windowSize, gsi: firstVirtioGSI + UInt32(index))
    }

    /// The backend of one disk: its image file, a copy-on-write overlay over its base, or nothing
    /// (an empty drive). A missing or unreadable image fails before the guest is loaded.
    static func openDisk(_ disk: DiskConfig) throws(SwiftletError) -> any BlockBackend {
        if disk.isEmpty { return EmptyBlockBackend() }
        if let base = disk.base, disk.path.isEmpty {
            let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
            let overlay = try OwnedFileDescriptor.unlinkedTemporaryFile(in: directory, prefix: "swiftlet-overlay")
            return try CopyOnWriteBlockBackend(base: base, overlay: overlay, named: "a temporary overlay in \(directory)")
        }
        if let base = disk.base { return try CopyOnWriteBlockBackend(base: base, overlay: disk.path) }
        return try FileBlockBackend(path: disk.path, readOnly: disk.readOnly)
    }

    /// A guest interrupt line driven through the in-kernel IOAPIC.
    static func interruptLine(vm: any HypervisorVM, gsi: UInt32, controller: MachineController) -> VMInterruptLine {
        VMInterruptLine { level in
            do { try vm.setInterruptLine(gsi, level: level) } catch {
                controller.stop(.vmmError("cannot drive interrupt line \(gsi): \(error)"))
            }
        }
    }

    /// The legacy devices on their ports: COM1, the i8042's reset line, the boot marker, pvpanic
    /// and the ACPI sleep control.
    static func makeBus(vm: any HypervisorVM, console: ConsoleOutput, controller: MachineController,
                        onBootMarker: (@Sendable (UInt64) -> Void)?) -> MachineDevices {
        let serial = Serial8250(output: console, interrupt: interruptLine(vm: vm, gsi: serialIRQ, controller: controller))
        var devices = MachineDevices(serial: serial)
        devices.ports.register(serial, base: Ports.serial, length: 8)
        devices.ports.register(I8042 { controller.stop(.reset) }, base: Ports.i8042, length: 5)
        devices.ports.register(BootMarker { time in
            controller.recordMarker(time)
            onBootMarker?(time)
        }, base: Ports.bootMarker, length: 1)
        devices.ports.register(PVPanic { events in
            if events & PVPanic.panicked != 0 { controller.stop(.guestPanic) }
        }, base: Ports.pvpanic, length: 1)
        devices.ports.register(ACPISleepControl(softOffType: ACPIConfiguration.softOffSleepType) { controller.stop(.powerOff) },
                               base: Ports.sleepControl, length: 1)
        return devices
    }

    static func pvmMessage(kvmPath: String) -> String {
        "\(kvmPath) on this host is backed by PVM (software virtualization, module kvm_pvm), which cannot boot an unmodified Linux kernel: it would run instruction-emulated for many seconds and then fail. Use a host with hardware KVM (Intel VT-x or AMD-V), boot a PVM-enabled guest kernel with --allow-pvm, or run Swiftlet inside the nested test host (scripts/nested-run)."
    }
}
