import ArgumentParser
import Hypervisor

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
