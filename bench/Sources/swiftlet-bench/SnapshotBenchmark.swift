import Glibc

// swiftlet-bench snapshot: restore against cold boot, in the same host and the same run.
// - snapshot: `swiftlet snapshot --image IMAGE --memory M -o DIR` (boot to a ready agent, write a
//   full snapshot), whole process, with the guest's pause and the bytes written.
// - cold boot: `swiftlet run --image IMAGE --memory M -- echo hi`, and restore:
//   `swiftlet run --from DIR -- echo hi`, alternately; p50/p90 of process start to the command's
//   first output ("hi" on stdout) and to exit, and Swiftlet's phases for the restore.
// - a persistent machine of the same image and memory, running: `machine snapshot` full and
//   --diff (after the guest wrote 1 MiB), and `machine fork --count K` rounds: time per clone
//   (the `machine fork` process's wall time, measured here from its start to its exit, over K;
//   the CLI's own account of it is kept beside) and each idle clone's VMM process's private
//   memory (what it does not share with the other clones: its own heap and the guest pages it
//   wrote); a clone whose memory cannot be read is counted as unreadable, never as 0 KiB.
//
// Usage: swiftlet-bench snapshot --swiftlet PATH --image OCI-LAYOUT --work DIR [--runs N] [--memory MiB]
//        [--forks K] [--fork-rounds R]

func snapshotBenchmark() {
    let flags = subcommandFlags(["--swiftlet", "--image", "--work", "--runs", "--memory", "--forks", "--fork-rounds"])
    let forks = flags["--forks"].flatMap { Int($0) } ?? 64, forkRounds = flags["--fork-rounds"].flatMap { Int($0) } ?? 10
    let swiftletPath = flags["--swiftlet"] ?? "/usr/local/bin/swiftlet", image = flags["--image"] ?? "", work = flags["--work"] ?? ""
    let runs = flags["--runs"].flatMap { Int($0) } ?? 30, memoryMiB = flags["--memory"].flatMap { Int($0) } ?? 512
    guard !image.isEmpty, !work.isEmpty else { fatal("--image and --work are required") }
    let pulled = spawnAndCollect([swiftletPath, "image", "pull", "-q", image])
    guard pulled.status == 0 else { fatal("swiftlet image pull \(image) failed:\n\(pulled.stderr)") }
    let digest = pulled.stdout.filter { !$0.isWhitespace }
    let memory = String(memoryMiB)

    // Snapshots: each to a new directory, removed after (but the last, which the restores use).
    var snapshotMs: [Double] = [], pausedMs: [Double] = [], bytes: [Double] = []
    let snapshotRuns = max(5, runs / 3)
    var directory = ""
    for i in 0..<snapshotRuns {
        directory = "\(work)/snapshot-\(i)"
        let o = observe([swiftletPath, "snapshot", "--image", digest, "--memory", memory, "--json", "-o", directory],
                        marker: [0], guestMemoryBytes: memoryMiB << 20)
        guard o.status == 0 else { fatal("swiftlet snapshot failed (status \(o.status)):\n\(o.stderr)") }
        snapshotMs.append(o.exitMs)
        pausedMs.append(jsonNumber(o.stdout, "pausedMilliseconds"))
        bytes.append(jsonNumber(o.stdout, "bytesWritten"))
        if i + 1 < snapshotRuns { _ = spawnAndCollect(["/bin/rm", "-rf", directory]) }
    }
    let memoryFileKiB = diskUsageKiB(directory + "/memory")

    let cold = [swiftletPath, "run", "--cold", "--image", digest, "--memory", memory, "--", "echo", "hi"]
    let restore = [swiftletPath, "run", "--from", directory, "--timing", "--", "echo", "hi"]
    // `run --image` as it runs by default: from the boot template of its machine shape (saved by
    // the first run, here before the measured ones).
    let template = [swiftletPath, "run", "--image", digest, "--memory", memory, "--", "echo", "hi"]
    guard spawnAndCollect(template).status == 0 else { fatal("swiftlet \(template.dropFirst().joined(separator: " ")) failed") }
    var coldRuns: [Observation] = [], restoreRuns: [Observation] = [], templateRuns: [Observation] = []
    var phases: [String: [Double]] = [:]
    let names = ["restore", "cold boot", "boot template"]
    for i in 0..<runs {
        for which in [[0, 1, 2], [2, 0, 1], [1, 2, 0]][i % 3] {
            let o = observe([restore, cold, template][which], marker: Array("hi\n".utf8), markerOn: .stdout, guestMemoryBytes: memoryMiB << 20)
            guard o.status == 0, o.stdout == "hi\n" else {
                fatal("\(names[which]) run \(i) failed (status \(o.status)):\n\(o.stdout)\n\(o.stderr)")
            }
            switch which {
            case 0:
                restoreRuns.append(o)
                addTimingPhases(o.stderr, to: &phases)
            case 1: coldRuns.append(o)
            default: templateRuns.append(o)
            }
        }
    }
    let templateFirst = templateRuns.map { $0.markerMs! }
    let machines = machineBenchmark(swiftletPath, digest: digest, memory: memory, work: work, snapshotRuns: snapshotRuns,
                                    forks: forks, forkRounds: forkRounds)
    let restoreFirst = restoreRuns.map { $0.markerMs! }, coldFirst = coldRuns.map { $0.markerMs! }
    let order = ["process", "snapshot", "vm", "connected", "ready", "command", "teardown"]
    // The library's part of a restore inside `swiftlet run --from` (a Linux guest, the CLI's
    // --timing phases): from `Machine.restoring` (the state file read, the machine built) to the
    // first KVM_RUN, without the process start and argument parsing before it. Not the same number
    // as library-restore.json's, a hand-written guest restored over and over in one process.
    let libraryRestore = zip(phases["snapshot"] ?? [], phases["vm"] ?? []).map { $0 + $1 }
    let phaseJSON = order.filter { phases[$0] != nil }.map { "\"\($0)\": \(stats(phases[$0]!))" }.joined(separator: ",\n        ")
    print("""
        {
          "benchmark": "snapshot",
          "host_kernel": "\(hostKernelRelease())",
          "guest_memory_mib": \(memoryMiB),
          "restore_arguments": "\(restore.dropFirst().joined(separator: " "))",
          "cold_boot_arguments": "\(cold.dropFirst().joined(separator: " "))",
          "restore_p50_ms": \(num(percentile(restoreFirst, 50))),
          "restore_p90_ms": \(num(percentile(restoreFirst, 90))),
          "cold_boot_p50_ms": \(num(percentile(coldFirst, 50))),
          "cold_boot_p90_ms": \(num(percentile(coldFirst, 90))),
          "speedup_p50": \(num(percentile(coldFirst, 50) / percentile(restoreFirst, 50))),
          "restore": {"runs": \(restoreRuns.count), "first_output_ms": \(stats(restoreFirst)), "exit_ms": \(stats(restoreRuns.map(\.exitMs))), "peak_rss_mib": \(stats(restoreRuns.map { Double($0.peakRSSKiB) / 1024 }))},
          "cli_restore_to_first_kvm_run_p50_ms": \(num(percentile(libraryRestore, 50))),
          "cli_restore_to_first_kvm_run_p90_ms": \(num(percentile(libraryRestore, 90))),
          "restore_phases_ms": {
            \(phaseJSON)
          },
          "template_arguments": "\(template.dropFirst().joined(separator: " "))",
          "template_p50_ms": \(num(percentile(templateFirst, 50))),
          "template_speedup_p50": \(num(percentile(coldFirst, 50) / percentile(templateFirst, 50))),
          "template": {"runs": \(templateRuns.count), "first_output_ms": \(stats(templateFirst)), "exit_ms": \(stats(templateRuns.map(\.exitMs))), "peak_rss_mib": \(stats(templateRuns.map { Double($0.peakRSSKiB) / 1024 }))},
          "cold_boot": {"runs": \(coldRuns.count), "first_output_ms": \(stats(coldFirst)), "exit_ms": \(stats(coldRuns.map(\.exitMs))), "peak_rss_mib": \(stats(coldRuns.map { Double($0.peakRSSKiB) / 1024 }))},
          "snapshot_full": {"runs": \(snapshotMs.count), "process_ms": \(stats(snapshotMs)), "guest_paused_ms": \(stats(pausedMs)), "bytes_written": \(stats(bytes)), "memory_file_kib_on_disk": \(memoryFileKiB)},
          "machine_snapshot_full": \(machines.full),
          "machine_snapshot_diff": \(machines.diff),
          "fork_clones": \(forks),
          "fork_rounds": \(forkRounds),
          "fork_timed_by": "the benchmark: wall time of the machine fork process, start to exit",
          "fork_p50_ms": \(num(percentile(machines.perClone, 50))),
          "fork_p90_ms": \(num(percentile(machines.perClone, 90))),
          "fork_rss_kib_per_clone": \(machines.privateKiB.isEmpty ? "null" : num(percentile(machines.privateKiB, 50))),
          "fork": {"per_clone_ms": \(stats(machines.perClone)), "total_ms": \(stats(machines.totalMs)), "cli_total_ms": \(stats(machines.cliTotalMs)), "source_snapshot_ms": \(stats(machines.snapshotMs)), "clones_measured": \(machines.privateKiB.count), "clones_unreadable": \(machines.unreadable), "clone_private_kib": \(machines.privateKiB.isEmpty ? "null" : stats(machines.privateKiB)), "clone_pss_kib": \(machines.pssKiB.isEmpty ? "null" : stats(machines.pssKiB))}
        }
        """)
}

/// A number field of a one-line JSON object (`"name":123.4`).
func jsonNumber(_ text: String, _ name: String) -> Double {
    guard let key = text.firstRange(of: "\"\(name)\":") else { fatal("no \(name) in \(text)") }
    return Double(text[key.upperBound...].prefix { $0.isNumber || $0 == "." }) ?? 0
}

/// Space a file takes on disk (its allocated blocks), KiB.
func diskUsageKiB(_ path: String) -> Int {
    var info = stat()
    guard stat(path, &info) == 0 else { return 0 }
    return Int(info.st_blocks) / 2
}

/// Snapshots and forks of a running machine (`swiftlet machine`), in SWIFTLET_HOME.
func machineBenchmark(_ swiftlet: String, digest: String, memory: String, work: String, snapshotRuns: Int, forks: Int, forkRounds: Int)
    -> (full: String, diff: String, perClone: [Double], totalMs: [Double], cliTotalMs: [Double], snapshotMs: [Double],
        privateKiB: [Double], pssKiB: [Double], unreadable: Int) {
    func machine(_ arguments: [String]) -> Observation {
        let o = spawnAndCollect([swiftlet, "machine"] + arguments)
        guard o.status == 0 else { fatal("swiftlet machine \(arguments.joined(separator: " ")) failed (status \(o.status)):\n\(o.stderr)") }
        return o
    }
    _ = spawnAndCollect([swiftlet, "machine", "rm", "-f", "bench-src"])
    _ = machine(["create", "--name", "bench-src", "--image", digest, "--memory", memory])
    _ = machine(["start", "bench-src"])
    defer { _ = spawnAndCollect([swiftlet, "machine", "rm", "-f", "bench-src"]) }

    var full: (ms: [Double], paused: [Double], bytes: [Double]) = ([], [], [])
    var diff: (ms: [Double], paused: [Double], bytes: [Double]) = ([], [], [])
    for i in 0..<snapshotRuns {
        let f = machine(["snapshot", "bench-src", "-o", "\(work)/machine-full-\(i)", "--json"])
        full.ms.append(f.exitMs); full.paused.append(jsonNumber(f.stdout, "pausedMilliseconds")); full.bytes.append(jsonNumber(f.stdout, "bytesWritten"))
        _ = machine(["exec", "bench-src", "--", "sh", "-c", "head -c 1048576 /dev/urandom > /dev/shm/dirty"])
        let d = machine(["snapshot", "bench-src", "-o", "\(work)/machine-diff-\(i)", "--diff", "--json"])
        diff.ms.append(d.exitMs); diff.paused.append(jsonNumber(d.stdout, "pausedMilliseconds")); diff.bytes.append(jsonNumber(d.stdout, "bytesWritten"))
        _ = spawnAndCollect(["/bin/rm", "-rf", "\(work)/machine-full-\(i)", "\(work)/machine-diff-\(i)"])
    }
    func snapshotStats(_ v: (ms: [Double], paused: [Double], bytes: [Double])) -> String {
        "{\"runs\": \(v.ms.count), \"process_ms\": \(stats(v.ms)), \"guest_paused_ms\": \(stats(v.paused)), \"bytes_written\": \(stats(v.bytes))}"
    }

    var perClone: [Double] = [], totalMs: [Double] = [], cliTotalMs: [Double] = [], snapshotMs: [Double] = []
    var privateKiB: [Double] = [], pssKiB: [Double] = [], unreadable = 0
    let home = String(cString: getenv("SWIFTLET_HOME") ?? strdup("/tmp"))
    for round in 0..<forkRounds {
        // Timed from outside: the process's start to its exit (observe's exitMs), not what it says of itself.
        let o = machine(["fork", "--from", "bench-src", "--name", "clone\(round)", "--count", String(forks), "--json"])
        totalMs.append(o.exitMs)
        perClone.append(o.exitMs / Double(forks))
        cliTotalMs.append(jsonNumber(o.stdout, "totalMilliseconds"))
        snapshotMs.append(jsonNumber(o.stdout, "snapshotMilliseconds"))
        usleep(2_000_000) // idle clones
        let names = forks == 1 ? ["clone\(round)"] : (1...forks).map { "clone\(round)-\($0)" }
        for name in names {
            let pid = ((try? String(contentsOf: "\(home)/machines/\(name)/vmm.pid")) ?? "").filter(\.isNumber)
            guard !pid.isEmpty, let rollup = try? String(contentsOf: "/proc/\(pid)/smaps_rollup"),
                  let clean = smapsKiB(rollup, "Private_Clean"), let dirty = smapsKiB(rollup, "Private_Dirty"), let pss = smapsKiB(rollup, "Pss")
            else { unreadable += 1; continue }
            privateKiB.append(clean + dirty)
            pssKiB.append(pss)
        }
        for name in names { _ = spawnAndCollect([swiftlet, "machine", "rm", "-f", name]) }
    }
    return (snapshotStats(full), snapshotStats(diff), perClone, totalMs, cliTotalMs, snapshotMs, privateKiB, pssKiB, unreadable)
}

/// A "Name:   123 kB" line of /proc/PID/smaps_rollup, KiB; nil when it has no such line.
func smapsKiB(_ text: String, _ name: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(name + ":") {
        return line.split(separator: " ").dropFirst().first.flatMap { Double($0) }
    }
    return nil
}

extension String {
    init(contentsOf path: String) throws {
        guard let file = fopen(path, "r") else { throw BenchError.cannotOpen(path) }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&chunk, 1, chunk.count, file)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        self = String(decoding: bytes, as: UTF8.self)
    }
}

enum BenchError: Error { case cannotOpen(String) }
