import ArgumentParser
import Hypervisor
import SwiftletKit
import SwiftletSystem

/// The machine flags `run` and `boot` share.
struct MachineOptions: ParsableArguments {
    @Option(help: "Guest kernel: an ELF vmlinux or a bzImage (default: the one `make kernel` built).")
    var kernel: String?

    @Option(name: .customLong("cpus"), help: "Number of vCPUs (default: 1).")
    var cpusOption: Int?

    @Option(name: .customLong("memory"), help: "Guest memory in MiB (default: 256).")
    var memoryOption: Int?

    @Option(help: ArgumentHelp("Show the guest only this CPU baseline's features, so its snapshots and packs restore on hosts of other CPU generations: \(CPUTemplate.allCases.map(\.rawValue).joined(separator: ", ")) (docs/pack-format.md).", valueName: "name"))
    var cpuTemplate: CPUTemplate?

    @Flag(help: "Boot even though /dev/kvm is PVM-backed (only a PVM-enabled guest kernel can run there).")
    var allowPVM = false

    var cpus: Int { cpusOption ?? 1 }
    var memory: Int { memoryOption ?? 256 }
    /// Whether any flag that shapes a new machine was given (a restored one has its snapshot's).
    var shapesTheMachine: Bool { kernel != nil || cpusOption != nil || memoryOption != nil || cpuTemplate != nil }
}

extension CPUTemplate: ExpressibleByArgument {
    public init?(argument: String) { self.init(named: argument) }
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}

/// `-v HOST_DIR:GUEST_DIR[:ro]`, as `run` and `machine create` take it.
struct VolumeOptions: ParsableArguments {
    @Option(name: [.customShort("v"), .customLong("volume")],
            help: ArgumentHelp("Share a host directory with the guest at GUEST_DIR (repeatable); :ro makes it read-only. Files the guest makes belong to you; your files are root's in the guest (docs/volumes.md).",
                               valueName: "host-dir:guest-dir[:ro]"))
    var volumes: [String] = []

    /// The volumes, checked (each host directory must exist now).
    func mounts() throws(SwiftletError) -> [VolumeMount] {
        var mounts: [VolumeMount] = []
        for text in volumes { mounts.append(try VolumeMount.parse(text)) }
        try VolumeMount.validate(mounts)
        return mounts
    }
}
