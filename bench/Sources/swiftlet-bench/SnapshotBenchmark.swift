import Glibc

// swiftlet-bench snapshot: restore against cold boot, in the same host and the same run.
// - snapshot: `swiftlet snapshot --image IMAGE --memory M -o DIR` (boot to a ready agent, write a
//   full snapshot), whole process, with the guest's pause and the bytes written.
// - cold boot: `swiftlet run --image IMAGE --memory M -- echo hi`, and restore:
//   `swiftlet run --from DIR -- echo hi`, alternately; p50/p90 of process start to the command's
//   first output ("hi" on stdout) and to exit, and Swiftlet's phases for the restore.
//
// Usage: swiftlet-bench snapshot --swiftlet PATH --image OCI-LAYOUT --work DIR [--runs N] [--memory MiB]

func snapshotBenchmark() {
    let flags = subcommandFlags(["--swiftlet", "--image", "--work", "--runs", "--memory"])
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

    let cold = [swiftletPath, "run", "--image", digest, "--memory", memory, "--", "echo", "hi"]
    let restore = [swiftletPath, "run", "--from", directory, "--timing", "--", "echo", "hi"]
    var coldRuns: [Observation] = [], restoreRuns: [Observation] = []
    var phases: [String: [Double]] = [:]
    for i in 0..<runs {
        for which in (i % 2 == 0 ? [0, 1] : [1, 0]) {
            let o = observe(which == 0 ? restore : cold, marker: Array("hi\n".utf8), markerOnStdout: true, guestMemoryBytes: memoryMiB << 20)
            guard o.status == 0, o.stdout == "hi\n" else {
                fatal("\(which == 0 ? "restore" : "cold boot") run \(i) failed (status \(o.status)):\n\(o.stdout)\n\(o.stderr)")
            }
            if which == 1 { coldRuns.append(o); continue }
            restoreRuns.append(o)
            addTimingPhases(o.stderr, to: &phases)
        }
    }
    let restoreFirst = restoreRuns.map { $0.markerMs! }, coldFirst = coldRuns.map { $0.markerMs! }
    let order = ["snapshot", "vm", "connected", "ready", "command", "teardown"]
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
          "restore_phases_ms": {
            \(phaseJSON)
          },
          "cold_boot": {"runs": \(coldRuns.count), "first_output_ms": \(stats(coldFirst)), "exit_ms": \(stats(coldRuns.map(\.exitMs))), "peak_rss_mib": \(stats(coldRuns.map { Double($0.peakRSSKiB) / 1024 }))},
          "snapshot_full": {"runs": \(snapshotMs.count), "process_ms": \(stats(snapshotMs)), "guest_paused_ms": \(stats(pausedMs)), "bytes_written": \(stats(bytes)), "memory_file_kib_on_disk": \(memoryFileKiB)},
          "snapshot_diff": null,
          "fork_p50_ms": null,
          "fork_rss_kib_per_clone": null,
          "not_measured": "diff snapshots and forks have no CLI yet (diff snapshots exist in the library only; forks are not built)"
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
