import Glibc

// swiftlet-bench run: `swiftlet run --image IMAGE -- true` (whole process, image already in the
// store, boot template saved) and the same with `--cold` (booting) against QEMU microvm booting
// the same kernel with the same root filesystem disk (the image's one layer, as Swiftlet
// converted it) to the same `true`, in rotation; p50/p90 of process start to exit, Swiftlet's
// phases, and the ratios. With --rootfs instead of --image, both boot
// that EROFS disk.
//
// Usage: swiftlet-bench run --swiftlet PATH --kernel VMLINUX (--image OCI-LAYOUT | --rootfs EROFS) [--runs N] [--qemu PATH]

func runBenchmark() {
    let flags = subcommandFlags(["--swiftlet", "--qemu", "--kernel", "--rootfs", "--image", "--runs", "--memory"])
    let swiftletPath = flags["--swiftlet"] ?? "/usr/local/bin/swiftlet", qemuPath = flags["--qemu"] ?? "/usr/bin/qemu-system-x86_64"
    let kernel = flags["--kernel"] ?? "", image = flags["--image"] ?? ""
    var rootfs = flags["--rootfs"] ?? ""
    let runs = flags["--runs"].flatMap { Int($0) } ?? 30, memoryMiB = flags["--memory"].flatMap { Int($0) } ?? 256
    guard !kernel.isEmpty, !rootfs.isEmpty || !image.isEmpty else { fatal("--kernel and --image or --rootfs are required") }

    var source = ["--rootfs", rootfs]
    if !image.isEmpty {
        // Into the store once (warm caches), then by digest; QEMU boots the disk the layer became.
        let pulled = spawnAndCollect([swiftletPath, "image", "pull", "-q", image])
        guard pulled.status == 0 else { fatal("swiftlet image pull \(image) failed:\n\(pulled.stderr)") }
        let digest = pulled.stdout.filter { !$0.isWhitespace }
        let inspect = spawnAndCollect([swiftletPath, "image", "inspect", digest]).stdout
        guard let field = inspect.firstRange(of: "\"diffIDs\""), let hash = inspect[field.upperBound...].firstRange(of: "sha256:") else {
            fatal("no diff IDs in swiftlet image inspect:\n\(inspect)")
        }
        let hex = String(inspect[hash.upperBound...].prefix(64))
        guard let home = getenv("SWIFTLET_HOME").map({ String(cString: $0) }) else { fatal("set SWIFTLET_HOME for --image") }
        rootfs = home + "/disks/sha256/" + hex + ".erofs"
        source = ["--image", digest]
    }
    let swiftletRun = [swiftletPath, "run", "--timing", "--kernel", kernel] + source + ["--memory", String(memoryMiB), "--", "true"]
    // The same run booting the kernel instead of restoring the boot template.
    let swiftletColdRun = [swiftletPath, "run", "--cold"] + swiftletRun.dropFirst(2)
    // QEMU has no agent: the kernel mounts the same EROFS disk as its root and /bin/sh runs the
    // same `true`, then reboots, which -no-reboot turns into an exit.
    let qemuCmdline = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3 root=/dev/vda rootfstype=erofs ro init=/bin/sh -- -c \"true; reboot -f\""
    let qemuRun = [qemuPath, "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on", "-enable-kvm", "-cpu", "host",
                   "-m", String(memoryMiB), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                   "-serial", "stdio", "-device", "i8042",
                   "-drive", "id=root,file=\(rootfs),format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=root",
                   "-kernel", kernel, "-append", qemuCmdline]

    // The first run of this machine shape boots and saves its boot template (reported once); the
    // measured runs restore it, as every later run does.
    let first = observe(swiftletRun, marker: Array("timing ".utf8), guestMemoryBytes: memoryMiB << 20)
    guard first.status == 0 else { fatal("the first swiftlet run failed (status \(first.status)):\n\(first.stdout)\n\(first.stderr)") }
    var swiftletRuns: [Observation] = [], coldRuns: [Observation] = [], qemuRuns: [Observation] = []
    var phases: [String: [Double]] = [:], coldPhases: [String: [Double]] = [:]
    let names = ["swiftlet", "swiftlet --cold", "qemu"]
    for i in 0..<runs {
        let order = [[0, 1, 2], [2, 0, 1], [1, 2, 0]][i % 3]
        for which in order {
            let o = observe([swiftletRun, swiftletColdRun, qemuRun][which], marker: Array("timing ".utf8), guestMemoryBytes: memoryMiB << 20)
            guard o.status == 0 else { fatal("\(names[which]) run \(i) failed (status \(o.status)):\n\(o.stdout)\n\(o.stderr)") }
            switch which {
            case 0:
                swiftletRuns.append(o)
                addTimingPhases(o.stderr, to: &phases)
            case 1:
                coldRuns.append(o)
                addTimingPhases(o.stderr, to: &coldPhases)
            default:
                qemuRuns.append(o)
            }
        }
    }
    let s50 = percentile(swiftletRuns.map(\.exitMs), 50), c50 = percentile(coldRuns.map(\.exitMs), 50), q50 = percentile(qemuRuns.map(\.exitMs), 50)
    let order = ["process", "image", "snapshot", "vm", "connected", "ready", "template", "root", "command", "teardown"]
    func phaseJSON(_ phases: [String: [Double]]) -> String {
        order.filter { phases[$0] != nil }.map { "\"\($0)\": \(stats(phases[$0]!))" }.joined(separator: ",\n        ")
    }
    func summary(_ runs: [Observation]) -> String {
        "{\"runs\": \(runs.count), \"exit_ms\": \(stats(runs.map(\.exitMs))), \"vmm_cpu_ms\": \(stats(runs.map(\.vmmCPUMs))), \"peak_rss_mib\": \(stats(runs.map { Double($0.peakRSSKiB) / 1024 }))}"
    }
    let release = hostKernelRelease()
    print("""
        {
          "benchmark": "run",
          "host_kernel": "\(release)",
          "guest_memory_mib": \(memoryMiB),
          "swiftlet_arguments": "\(swiftletRun.dropFirst().joined(separator: " "))",
          "swiftlet_cold_arguments": "\(swiftletColdRun.dropFirst().joined(separator: " "))",
          "qemu_arguments": "\(qemuRun.dropFirst().joined(separator: " ").replacingQuotes())",
          "template_saving_run_ms": \(String((first.exitMs * 100).rounded() / 100)),
          "swiftlet": \(summary(swiftletRuns)),
          "swiftlet_phases_ms": {
            \(phaseJSON(phases))
          },
          "swiftlet_cold": \(summary(coldRuns)),
          "swiftlet_cold_phases_ms": {
            \(phaseJSON(coldPhases))
          },
          "qemu": \(summary(qemuRuns)),
          "ratio_p50": \(String((s50 / q50 * 1000).rounded() / 1000)),
          "cold_ratio_p50": \(String((c50 / q50 * 1000).rounded() / 1000))
        }
        """)
}

/// The flags of a subcommand (`swiftlet-bench NAME --flag value ...`), each of `known` at most once.
func subcommandFlags(_ known: Set<String>) -> [String: String] {
    var flags: [String: String] = [:]
    var args = CommandLine.arguments.dropFirst(2)
    while let flag = args.popFirst() {
        guard let value = args.popFirst() else { fatal("\(flag) needs a value") }
        guard known.contains(flag) else { fatal("unknown flag \(flag)") }
        flags[flag] = value
    }
    return flags
}

/// Adds the phases of a `swiftlet run --timing` line ("timing A=ms B=ms ...", each mark in ms from
/// process start) to `phases`, as the time from the previous mark (the first from 0).
func addTimingPhases(_ stderr: String, to phases: inout [String: [Double]]) {
    guard let line = stderr.split(separator: "\n").first(where: { $0.contains("timing ") }) else { fatal("no timing line:\n\(stderr)") }
    var previous = 0.0
    for field in line.split(separator: " ").dropFirst(2) {
        let parts = field.split(separator: "=")
        guard parts.count == 2, let at = Double(parts[1]) else { continue }
        phases[String(parts[0]), default: []].append(at - previous)
        previous = at
    }
}

extension String {
    func replacingQuotes() -> String { split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\\\"") }
}

/// The running kernel's release (uname -r), for the results.
func hostKernelRelease() -> String {
    var uts = utsname()
    uname(&uts)
    return withUnsafeBytes(of: uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
}

/// Runs a helper command to completion and returns its output.
func spawnAndCollect(_ arguments: [String]) -> Observation {
    observe(arguments, marker: [0], guestMemoryBytes: 0)
}
