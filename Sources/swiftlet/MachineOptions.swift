import ArgumentParser

/// The machine flags `run` and `boot` share.
struct MachineOptions: ParsableArguments {
    @Option(help: "Guest kernel: an ELF vmlinux or a bzImage (default: the one `make kernel` built).")
    var kernel: String?

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: "Guest memory in MiB.")
    var memory: Int = 256

    @Flag(help: "Boot even though /dev/kvm is PVM-backed (only a PVM-enabled guest kernel can run there).")
    var allowPVM = false
}
