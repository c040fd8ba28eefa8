import ArgumentParser
import Devices
import Glibc
import SwiftletSystem
import SwiftletKit
import VMM

struct Boot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boot",
        abstract: "Boot a Linux kernel and stream its serial console.",
        discussion: """
            Boots an ELF vmlinux or a bzImage (default: the kernel `make kernel` built) with the demo \
            initramfs, and exits 0 when the guest powers off or reboots. Arguments after `--` are \
            passed to the guest's init, which runs them as a command:

              swiftlet boot -- uname -a
            """)

    @Option(help: "Initial ramdisk (cpio archive).")
    var initrd: String?

    @Flag(help: "Boot without an initial ramdisk.")
    var noInitrd = false

    @Option(help: "Kernel command line (replaces the default).")
    var cmdline: String = MachineConfig.defaultCommandLine

    @Option(name: .customLong("disk"), help: ArgumentHelp(
        "A raw disk image for the guest (/dev/vda, /dev/vdb, ... in order); append ,ro for read-only. Repeatable.",
        valueName: "path[,ro]"))
    var disks: [String] = []

    @Option(name: .customLong("vsock-forward"), help: ArgumentHelp(
        "Give the guest a virtio socket device (CID 3); its connections to host port PORT go to the Unix socket SOCKET. Repeatable.",
        valueName: "port:socket"))
    var vsockForwards: [String] = []

    @Flag(help: "Give the guest a virtio entropy device (/dev/hwrng) fed from the host's getrandom.")
    var rng = false

    @Flag(help: "Give the guest a virtio balloon with free page reporting: memory it frees goes back to the host.")
    var balloon = false

    @Option(name: .customLong("share"), help: ArgumentHelp(
        "Share a host directory with the guest through a virtio-fs device (tag `swiftlet`; the Nth is vN in it: mount -t virtiofs swiftlet DIR). Repeatable.",
        valueName: "dir[:ro]"))
    var shares: [String] = []

    @Flag(help: "Print the time from process start to the guest's boot marker, and the VMM's costs.")
    var bootTiming = false

    @Option(help: ArgumentHelp("Write a JSON report of the run to this file.", visibility: .hidden))
    var report: String?

    @OptionGroup var machine: MachineOptions

    @Argument(parsing: .postTerminator, help: "Command for the guest's init to run.")
    var command: [String] = []

    /// Parses `--disk path[,ro]`.
    static func diskConfig(_ argument: String) throws(ValidationError) -> DiskConfig {
        var path = Substring(argument)
        var readOnly = false
        if let comma = argument.lastIndex(of: ",") {
            let option = argument[argument.index(after: comma)...]
            guard option == "ro" || option == "rw" else {
                throw ValidationError("--disk \(argument): unknown option '\(option)' (use path,ro or path,rw)")
            }
            readOnly = option == "ro"
            path = argument[..<comma]
        }
        guard !path.isEmpty else { throw ValidationError("--disk needs a path") }
        return DiskConfig(path: String(path), readOnly: readOnly)
    }

    /// Parses `--vsock-forward port:socket` options into a vsock configuration (nil for none).
    static func vsockConfig(_ arguments: [String]) throws(ValidationError) -> VsockConfig? {
        guard !arguments.isEmpty else { return nil }
        var forwards: [UInt32: String] = [:]
        for argument in arguments {
            guard let colon = argument.firstIndex(of: ":"), let port = UInt32(argument[..<colon]),
                  argument.index(after: colon) < argument.endIndex else {
                throw ValidationError("--vsock-forward \(argument): expected PORT:SOCKET, e.g. 1024:/run/agent.sock")
            }
            guard forwards[port] == nil else { throw ValidationError("--vsock-forward: port \(port) is given twice") }
            forwards[port] = String(argument[argument.index(after: colon)...])
        }
        return VsockConfig(forwards: forwards)
    }

    func validate() throws {
        for disk in disks { _ = try Self.diskConfig(disk) }
        _ = try Self.vsockConfig(vsockForwards)
        if noInitrd && initrd != nil { throw ValidationError("--initrd and --no-initrd contradict each other") }
        for argument in command where argument.contains(where: { $0 == "\"" || $0.isNewline }) {
            throw ValidationError("guest command arguments cannot contain double quotes or newlines (the kernel command line cannot carry them): \(argument)")
        }
    }

    /// The kernel command line: the base line, then ` -- ` and the init arguments, each
    /// double-quoted when it holds spaces (the kernel's parser strips the quotes).
    static func kernelCommandLine(base: String, command: [String]) -> String {
        guard !command.isEmpty else { return base }
        let quoted = command.map { $0.isEmpty || $0.contains(where: \.isWhitespace) ? "\"\($0)\"" : $0 }
        return base + " -- " + quoted.joined(separator: " ")
    }

    func run() throws {
        let commandLine = Self.kernelCommandLine(base: cmdline, command: command)
        let initrdPath: String? = noInitrd ? nil : (initrd ?? defaultInitrd())
        var config = MachineConfig(
            kernelPath: machine.kernel ?? GuestAssets.defaultKernel(), initrdPath: initrdPath, commandLine: commandLine,
            cpuCount: machine.cpus, memoryMiB: machine.memory, allowPVM: machine.allowPVM, consoleOutput: 1, consoleInput: 0,
            disks: try disks.map { disk throws(ValidationError) in try Self.diskConfig(disk) }, entropyDevice: rng,
            vsock: try Self.vsockConfig(vsockForwards))
        if let device = getenv("SWIFTLET_KVM_DEVICE") { config.kvmPath = String(cString: device) }
        config.cpuTemplate = machine.cpuTemplate
        config.balloon = balloon
        config.volumes = shares.map { share in
            share.hasSuffix(":ro") ? SharedVolume(path: String(share.dropLast(3)), readOnly: true) : SharedVolume(path: share, readOnly: false)
        }

        let machine = Machine(config: config)
        let showTiming = bootTiming
        let outcome = try exitingOnSetupFailure { () throws(SwiftletError) in
            try machine.runBlocking(onBootMarker: { time in
                if showTiming {
                    let ms = MonotonicClock.milliseconds(from: MonotonicClock.processStart, to: time)
                    printError("boot marker after \(format(ms)) ms (process start to marker)")
                }
            }, beforeGuestRuns: { largestFile throws(SwiftletError) in try Confinement.confine(.vmm, largestFile: largestFile, descriptors: machine.descriptorLimit) })
        }
        for warning in outcome.warnings { printError("warning: \(warning)") }
        if showTiming { printTiming(outcome) }
        if let report { writeReport(outcome, to: report) }
        guard outcome.exit.isClean else {
            printError(outcome.exit.description)
            throw ExitCode(Status.guestCrashed)
        }
    }

    /// The demo initramfs, when it has been built; otherwise boot without one.
    func defaultInitrd() -> String? {
        let path = GuestAssets.defaultInitrd
        return access(path, R_OK) == 0 ? path : nil
    }

    func printTiming(_ r: MachineRunReport) {
        let total = MonotonicClock.milliseconds(from: r.processStart, to: r.end)
        let setup = MonotonicClock.milliseconds(from: r.processStart, to: r.firstRun)
        printError("\(r.exit) after \(format(total)) ms (VMM set-up \(format(setup)) ms); \(r.exitsToUserspace) exits to userspace")
        var previous = r.processStart
        let steps = r.phases.map { phase -> String in
            defer { previous = phase.end }
            return "\(phase.name == "start" ? "runtime" : phase.name) \(format(MonotonicClock.milliseconds(from: previous, to: phase.end), digits: 2))"
        }
        printError("set-up (ms): " + steps.joined(separator: ", ") + ", threads \(format(MonotonicClock.milliseconds(from: previous, to: r.firstRun), digits: 2))")
        printError("memory: peak RSS \(r.peakResidentBytes >> 10) KiB, guest memory touched \(r.guestMemoryResidentBytes >> 10) KiB, VMM overhead \(r.vmmOverheadBytes >> 10) KiB")
        if !r.portTrace.isEmpty {
            let top = r.portTrace.sorted { $0.value > $1.value }.prefix(12)
            printError("port I/O: " + top.map { "0x\(String($0.key, radix: 16))×\($0.value)" }.joined(separator: " "))
        }
    }

    func writeReport(_ r: MachineRunReport, to path: String) {
        func ms(_ t: UInt64?) -> String { t.map { format(MonotonicClock.milliseconds(from: r.processStart, to: $0), digits: 3) } ?? "null" }
        let json = """
            {"exit":"\(r.exit.isClean ? "clean" : "crash")","marker_ms":\(ms(r.bootMarker)),"first_run_ms":\(ms(r.firstRun)),\
            "end_ms":\(ms(r.end)),"exits":\(r.exitsToUserspace),"peak_rss_kib":\(r.peakResidentBytes >> 10),\
            "guest_touched_kib":\(r.guestMemoryResidentBytes >> 10),"vmm_overhead_kib":\(r.vmmOverheadBytes >> 10)}

            """
        guard let fd = try? OwnedFileDescriptor.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC) else {
            printError("cannot write report \(path)")
            return
        }
        var text = json
        text.withUTF8 { try? fd.writeAll(UnsafeRawBufferPointer($0)) }
    }
}

/// Fixed-point formatting without Foundation.
func format(_ value: Double, digits: Int = 1) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = Int((value * scale).rounded())
    let whole = scaled / Int(scale), fraction = abs(scaled % Int(scale))
    guard digits > 0 else { return String(whole) }
    let f = String(fraction)
    return "\(whole).\(String(repeating: "0", count: digits - f.count))\(f)"
}
