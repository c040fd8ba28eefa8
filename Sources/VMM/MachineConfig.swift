import Devices
import Hypervisor
import LinuxBoot
import SwiftletNet
import SwiftletSystem

/// Everything needed to boot a machine. Plain values: a config can be stored, compared and sent.
public struct MachineConfig: Sendable, Equatable {
    /// ELF vmlinux or bzImage.
    public var kernelPath: String
    public var initrdPath: String?
    public var commandLine: String
    public var cpuCount: Int
    public var memoryMiB: Int
    /// The KVM device (tests point this elsewhere).
    public var kvmPath: String
    /// Boot a Linux kernel even though /dev/kvm is PVM-backed (only PVM-enabled kernels run there).
    public var allowPVM: Bool
    /// Where the guest's serial console goes (a file descriptor the caller keeps open), or nil to drop it.
    public var consoleOutput: Int32?
    /// Where console input comes from, or nil for none.
    public var consoleInput: Int32?
    /// Block devices, in order: the guest sees them as /dev/vda, /dev/vdb, ...
    public var disks: [DiskConfig]
    /// A virtio entropy device fed from the host's getrandom(2).
    public var entropyDevice: Bool
    /// A virtio socket device, or nil for none.
    public var vsock: VsockConfig?
    /// A virtio network device, or nil for none (the guest has only `lo`).
    public var network: NetworkDeviceConfig?
    /// A virtio balloon with free page reporting: the pages the guest frees go back to the host,
    /// and `Machine.setMemoryTarget` can take memory from a running guest and give it back.
    public var balloon: Bool = false
    /// Host directories shared with the guest through one virtio-fs device (tag
    /// `VirtioFS.defaultTag`; volume N is `vN` in its root). Empty: no such device.
    public var volumes: [SharedVolume] = []
    /// The CPU baseline the guest is shown (nil: all the host's KVM offers).
    public var cpuTemplate: CPUTemplate? = nil

    /// The default kernel command line: console on the first UART, reboot through the i8042,
    /// reboot at once on panic (after pvpanic has told the VMM), no PCI bus scan, and only critical
    /// kernel messages (each console line is costly; `loglevel=3` also hides the harmless
    /// "PCI: Fatal: No config space access function" that `pci=off` provokes).
    public static let defaultCommandLine = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3"

    /// Smallest memory a Linux guest can boot in with Swiftlet's kernel.
    public static let minimumMemoryMiB = 32
    /// xAPIC IDs in the MADT are 8-bit and 0xFF is broadcast.
    public static let maximumCPUs = 254
    /// virtio devices take IOAPIC pins 5 and up (of 24): 19 in all, so 15 disks beside the
    /// entropy, vsock, network and balloon devices (a machine that also shares host directories,
    /// one more device, has room for one disk less: `virtioDeviceCount` is checked).
    public static let maximumDisks = 15
    /// Host directories one machine may share.
    public static let maximumVolumes = 16
    public static let maximumVirtioDevices = 19

    public init(kernelPath: String, initrdPath: String? = nil, commandLine: String = MachineConfig.defaultCommandLine,
                cpuCount: Int = 1, memoryMiB: Int = 256, kvmPath: String = "/dev/kvm", allowPVM: Bool = false,
                consoleOutput: Int32? = 1, consoleInput: Int32? = nil, disks: [DiskConfig] = [],
                entropyDevice: Bool = false, vsock: VsockConfig? = nil, network: NetworkDeviceConfig? = nil) {
        self.kernelPath = kernelPath; self.initrdPath = initrdPath; self.commandLine = commandLine
        self.cpuCount = cpuCount; self.memoryMiB = memoryMiB; self.kvmPath = kvmPath; self.allowPVM = allowPVM
        self.consoleOutput = consoleOutput; self.consoleInput = consoleInput; self.disks = disks
        self.entropyDevice = entropyDevice
        self.vsock = vsock
        self.network = network
    }

    /// Checks the values that do not depend on the host.
    public func validate() throws(SwiftletError) { try shape.validate() }

    /// Checks the values against what this host can give.
    public func validate(maxVCPUs: Int, hostMemoryBytes: UInt64?) throws(SwiftletError) {
        try shape.validate(maxVCPUs: maxVCPUs, hostMemoryBytes: hostMemoryBytes)
    }
}

/// What a machine is, however it starts: its hardware (vCPUs, memory, devices) and the host
/// resources it uses. A booted machine takes it from its `MachineConfig`; a restored one from its
/// snapshot and the restore's options.
public struct MachineShape: Sendable, Equatable {
    public var cpuCount: Int
    public var memoryMiB: Int
    /// Block devices, in order: /dev/vda, /dev/vdb, ...
    public var disks: [DiskConfig]
    public var entropyDevice: Bool
    public var vsock: VsockConfig?
    public var network: NetworkDeviceConfig?
    public var balloon: Bool
    public var volumes: [SharedVolume]
    public var kvmPath: String
    public var allowPVM: Bool
    public var consoleOutput: Int32?
    public var consoleInput: Int32?

    public init(cpuCount: Int, memoryMiB: Int, disks: [DiskConfig], entropyDevice: Bool, vsock: VsockConfig?,
                network: NetworkDeviceConfig? = nil, balloon: Bool = false, volumes: [SharedVolume] = [],
                kvmPath: String = "/dev/kvm", allowPVM: Bool = false, consoleOutput: Int32? = nil, consoleInput: Int32? = nil) {
        self.cpuCount = cpuCount; self.memoryMiB = memoryMiB; self.disks = disks; self.entropyDevice = entropyDevice
        self.vsock = vsock; self.network = network; self.balloon = balloon; self.volumes = volumes; self.kvmPath = kvmPath; self.allowPVM = allowPVM
        self.consoleOutput = consoleOutput; self.consoleInput = consoleInput
    }

    /// Checks the values that do not depend on the host.
    public func validate() throws(SwiftletError) {
        guard cpuCount >= 1 else {
            throw SwiftletError(.invalidArgument, "--cpus must be at least 1 (got \(cpuCount))")
        }
        guard cpuCount <= MachineConfig.maximumCPUs else {
            throw SwiftletError(.invalidArgument, "--cpus \(cpuCount) is more than Swiftlet supports (\(MachineConfig.maximumCPUs))")
        }
        guard memoryMiB >= MachineConfig.minimumMemoryMiB else {
            throw SwiftletError(.invalidArgument, "--memory must be at least \(MachineConfig.minimumMemoryMiB) MiB (got \(memoryMiB))")
        }
        guard memoryMiB <= 1 << 20 else {
            throw SwiftletError(.invalidArgument, "--memory \(memoryMiB) MiB is more than 1 TiB")
        }
        if let vsock, vsock.guestCID < 3 || vsock.guestCID >= UInt64(UInt32.max) {
            throw SwiftletError(.invalidArgument, "vsock guest CID \(vsock.guestCID) is reserved: use 3 or more")
        }
        guard disks.count <= MachineConfig.maximumDisks else {
            throw SwiftletError(.invalidArgument, "\(disks.count) disks are more than Swiftlet supports (\(MachineConfig.maximumDisks))")
        }
        guard virtioDeviceCount <= MachineConfig.maximumVirtioDevices else {
            throw SwiftletError(.invalidArgument, "\(disks.count) disks and \(virtioDeviceCount - disks.count) other virtio devices are more than the machine's \(MachineConfig.maximumVirtioDevices) interrupt lines")
        }
        guard volumes.count <= MachineConfig.maximumVolumes else {
            throw SwiftletError(.invalidArgument, "\(volumes.count) volumes are more than Swiftlet supports (\(MachineConfig.maximumVolumes))")
        }
        if let network {
            guard network.backend >= 0 else {
                throw SwiftletError(.invalidArgument, "the network device has no backend socket")
            }
            guard network.guest.mtu >= Int(VirtioNet.minimumMTU), network.guest.mtu <= Int(UInt16.max) else {
                throw SwiftletError(.invalidArgument, "a network MTU of \(network.guest.mtu) is outside \(VirtioNet.minimumMTU)...\(UInt16.max)")
            }
        }
    }

    /// The virtio devices the machine has (each takes an interrupt line).
    public var virtioDeviceCount: Int {
        disks.count + (entropyDevice ? 1 : 0) + (vsock == nil ? 0 : 1) + (network == nil ? 0 : 1) + (balloon ? 1 : 0) + (volumes.isEmpty ? 0 : 1)
    }

    /// Checks the values against what this host can give.
    public func validate(maxVCPUs: Int, hostMemoryBytes: UInt64?) throws(SwiftletError) {
        try validate()
        guard cpuCount <= maxVCPUs else {
            throw SwiftletError(.invalidArgument, "--cpus \(cpuCount) is more than this host's KVM allows per VM (\(maxVCPUs))")
        }
        if let host = hostMemoryBytes, UInt64(memoryMiB) << 20 > host {
            throw SwiftletError(.invalidArgument, "--memory \(memoryMiB) MiB is more than this host's \(host >> 20) MiB of RAM")
        }
    }
}

extension MachineConfig {
    /// The machine this configuration boots.
    public var shape: MachineShape {
        MachineShape(cpuCount: cpuCount, memoryMiB: memoryMiB, disks: disks, entropyDevice: entropyDevice, vsock: vsock,
                     network: network, balloon: balloon, volumes: volumes, kvmPath: kvmPath, allowPVM: allowPVM, consoleOutput: consoleOutput, consoleInput: consoleInput)
    }
}

/// A disk image the guest sees as a virtio block device.
public struct DiskConfig: Sendable, Equatable {
    /// A raw image file or a block device.
    public var path: String
    /// The guest can read but not write it (and the file is opened read-only).
    public var readOnly: Bool
    /// When set, the disk is copy-on-write over this read-only base image: `path` is the overlay
    /// that holds what the guest writes (created if missing; several overlays can share a base).
    /// An empty `path` makes the overlay an unnamed temporary file: the writes are thrown away
    /// when the machine ends.
    public var base: String?

    public init(path: String, readOnly: Bool = false, base: String? = nil) {
        self.path = path; self.readOnly = readOnly; self.base = base
    }

    /// An empty drive: the guest sees a read-only disk of capacity zero until a disk is
    /// inserted into it (`Machine.insertDisk(at:_:)`).
    public static let empty = DiskConfig(path: "", readOnly: true)

    /// Whether this is an empty drive.
    public var isEmpty: Bool { path.isEmpty && base == nil }
}

/// A virtio network device: the guest's NIC, joined to a user-mode network stack (passt) by a
/// stream socket in passt's framing, with the host's egress policy enforced between the two
/// (`EgressFilter`), where the guest cannot change it.
public struct NetworkDeviceConfig: Sendable, Equatable {
    /// The guest's addresses (its MAC and MTU are the device's; the rest is what the policy and
    /// the agent's configuration use).
    public var guest: GuestNetwork
    /// What the guest may reach.
    public var policy: NetworkConfiguration
    /// A connected stream socket to the network stack, in passt's framing (a 4-byte big-endian
    /// length, then the Ethernet frame). The caller keeps it open until the machine's run has
    /// started; the machine works on a duplicate of its own.
    public var backend: Int32
    /// Where the filter's lines go (blocked attempts, at most one per destination every 10 s);
    /// nil: the run's warnings.
    public var log: (@Sendable (String) -> Void)?

    public init(guest: GuestNetwork = .default, policy: NetworkConfiguration, backend: Int32,
                log: (@Sendable (String) -> Void)? = nil) {
        self.guest = guest; self.policy = policy; self.backend = backend; self.log = log
    }

    public static func == (a: NetworkDeviceConfig, b: NetworkDeviceConfig) -> Bool {
        a.guest == b.guest && a.policy == b.policy && a.backend == b.backend
    }
}
