import CLinux
import Glibc

// swiftlet-bench boot: boots the same kernel and initramfs with `swiftlet boot` and with
// `qemu-system-x86_64 -M microvm` alternately, and prints JSON with p50/p90 of process start to
// boot marker and to exit, the ratio, VMM CPU time, exits to userspace and memory overhead.
//
// Usage: swiftlet-bench boot --swiftlet PATH --kernel VMLINUX --initrd CPIO [--runs N] [--memory MiB] [--qemu PATH]

struct Options {
    var swiftlet = "/usr/local/bin/swiftlet"
    var qemu = "/usr/bin/qemu-system-x86_64"
    var kernel = ""
    var initrd = ""
    var runs = 30
    var costRuns = 5
    var memoryMiB = 256
}

func parse() -> Options {
    var o = Options()
    guard CommandLine.arguments.dropFirst().first == "boot" else {
        fatal("usage: swiftlet-bench run ... | swiftlet-bench snapshot ... | swiftlet-bench library-restore ... | swiftlet-bench boot --kernel VMLINUX --initrd CPIO [--runs N] [--swiftlet PATH] [--qemu PATH] [--memory MiB]")
    }
    let flags = subcommandFlags(["--swiftlet", "--qemu", "--kernel", "--initrd", "--runs", "--cost-runs", "--memory"])
    o.swiftlet = flags["--swiftlet"] ?? o.swiftlet
    o.qemu = flags["--qemu"] ?? o.qemu
    o.kernel = flags["--kernel"] ?? o.kernel
    o.initrd = flags["--initrd"] ?? o.initrd
    o.runs = flags["--runs"].flatMap { Int($0) } ?? o.runs
    o.costRuns = flags["--cost-runs"].flatMap { Int($0) } ?? o.costRuns
    o.memoryMiB = flags["--memory"].flatMap { Int($0) } ?? o.memoryMiB
    guard !o.kernel.isEmpty, !o.initrd.isEmpty else { fatal("--kernel and --initrd are required") }
    return o
}

if CommandLine.arguments.dropFirst().first == "run" {
    runBenchmark()
    exit(0)
}
if CommandLine.arguments.dropFirst().first == "snapshot" {
    snapshotBenchmark()
    exit(0)
}
if CommandLine.arguments.dropFirst().first == "library-restore" {
    libraryRestoreBenchmark()
    exit(0)
}
let options = parse()
let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off loglevel=3"

/// The two contenders. Both boot the same vmlinux (QEMU through its PVH entry) and initramfs with
/// the same command line; the guest's init writes the marker and reboots, which ends both.
struct VMM {
    let name: String
    let arguments: [String]
    let marker: [UInt8]
    var markerOn = MarkerStream.stderr
}

let swiftlet = VMM(name: "swiftlet", arguments: [
    options.swiftlet, "boot", "--kernel", options.kernel, "--initrd", options.initrd, "--memory", String(options.memoryMiB),
    "--cpus", "1", "--cmdline", cmdline, "--boot-timing",
], marker: Array("boot marker after".utf8))

// QEMU's microvm tuned for a fast boot: no option ROMs, RTC, ACPI, PIT, PIC or default devices;
// the same 16550 console; an i8042 for `reboot=k` (as Swiftlet has), which `-no-reboot` turns into
// an exit; isa-debugcon on port 0x3f0 turns the guest's marker write (the byte 123, from
// guest/initramfs/marker.c) into a byte on descriptor 3, a pipe of its own: nothing else QEMU
// writes can pass for the marker, and a run whose port saw anything but that one byte is an error.
let qemu = VMM(name: "qemu-microvm", arguments: [
    options.qemu, "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,pit=off,pic=off,isa-serial=on", "-enable-kvm", "-cpu", "host",
    "-m", String(options.memoryMiB), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-serial", "stdio", "-device", "i8042", "-chardev", "file,id=marker,path=/proc/self/fd/3", "-device", "isa-debugcon,iobase=0x3f0,chardev=marker",
    "-kernel", options.kernel, "-initrd", options.initrd, "-append", cmdline,
], marker: [123], markerOn: .descriptor3)

var samples: [String: [Observation]] = [:]
for i in 0..<options.runs {
    for vmm in (i % 2 == 0 ? [swiftlet, qemu] : [qemu, swiftlet]) {
        let o = observe(vmm.arguments, marker: vmm.marker, markerOn: vmm.markerOn, guestMemoryBytes: options.memoryMiB << 20)
        guard o.status == 0, o.markerMs != nil else {
            fatal("\(vmm.name) run \(i) failed (status \(o.status), marker \(o.markerMs != nil)):\n\(o.stdout)\n\(o.stderr)")
        }
        if vmm.markerOn == .descriptor3, o.markerStream != vmm.marker {
            fatal("\(vmm.name) run \(i): the marker port saw \(o.markerStream), not the one byte \(vmm.marker)")
        }
        samples[vmm.name, default: []].append(o)
    }
}

var exits: [String: [Int]] = [:]
if let trace = ExitTrace() {
    for _ in 0..<options.costRuns {
        for vmm in [swiftlet, qemu] {
            let n = trace.count { _ = observe(vmm.arguments, marker: vmm.marker, markerOn: vmm.markerOn, guestMemoryBytes: options.memoryMiB << 20) }
            exits[vmm.name, default: []].append(n)
        }
    }
}

func percentile(_ values: [Double], _ p: Double) -> Double {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return 0 }
    let rank = p / 100 * Double(sorted.count - 1)
    let low = Int(rank), high = min(low + 1, sorted.count - 1)
    return sorted[low] + (sorted[high] - sorted[low]) * (rank - Double(low))
}

func num(_ v: Double) -> String {
    let scaled = (v * 100).rounded() / 100
    return String(scaled)
}

func stats(_ values: [Double]) -> String {
    "{\"p50\": \(num(percentile(values, 50))), \"p90\": \(num(percentile(values, 90))), \"min\": \(num(values.min() ?? 0)), \"max\": \(num(values.max() ?? 0))}"
}

@MainActor func summary(_ name: String) -> String {
    let o = samples[name]!
    let overhead = o.compactMap { s -> Double? in
        guard let total = s.rssAtMarkerKiB, let guest = s.guestRSSAtMarkerKiB else { return nil }
        return Double(total - guest) / 1024
    }
    let exitCounts = exits[name].map { $0.map(Double.init) } ?? []
    return """
        {
            "runs": \(o.count),
            "marker_ms": \(stats(o.map { $0.markerMs! })),
            "exit_ms": \(stats(o.map(\.exitMs))),
            "vmm_cpu_ms": \(stats(o.map(\.vmmCPUMs))),
            "peak_rss_mib": \(stats(o.map { Double($0.peakRSSKiB) / 1024 })),
            "vmm_overhead_mib_at_marker": \(stats(overhead)),
            "exits_to_userspace": \(exitCounts.isEmpty ? "null" : stats(exitCounts))
          }
        """
}

let s50 = percentile(samples["swiftlet"]!.map { $0.markerMs! }, 50)
let q50 = percentile(samples["qemu-microvm"]!.map { $0.markerMs! }, 50)
let se50 = percentile(samples["swiftlet"]!.map(\.exitMs), 50)
let qe50 = percentile(samples["qemu-microvm"]!.map(\.exitMs), 50)
let release = hostKernelRelease()
print("""
    {
      "benchmark": "boot",
      "host_kernel": "\(release)",
      "guest_memory_mib": \(options.memoryMiB),
      "cmdline": "\(cmdline)",
      "qemu_arguments": "\(qemu.arguments.dropFirst().joined(separator: " "))",
      "qemu_marker": "byte 123 alone on isa-debugcon's own pipe (descriptor 3)",
      "swiftlet": \(summary("swiftlet")),
      "qemu": \(summary("qemu-microvm")),
      "ratio_marker_p50": \(String((s50 / q50 * 1000).rounded() / 1000)),
      "ratio_exit_p50": \(String((se50 / qe50 * 1000).rounded() / 1000))
    }
    """)
