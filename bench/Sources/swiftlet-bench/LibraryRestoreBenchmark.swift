import Glibc
import Synchronization
import SwiftletSystem
import TestSupport
import VMM

// swiftlet-bench library-restore: the library's restore alone, in this process: a small
// hand-written guest (it counts and prints each count's low byte on the serial port, forever)
// runs, is snapshotted, and is restored again and again with `Machine.restoring` + `runBlocking`;
// p50/p90 of the call to the first KVM_RUN ("running guest") and to the restored guest's first
// serial output. No Linux guest, so it also runs where /dev/kvm cannot boot Linux (PVM).
//
// Usage: swiftlet-bench library-restore --work DIR [--runs N] [--memory MiB]

func libraryRestoreBenchmark() {
    let flags = subcommandFlags(["--work", "--runs", "--memory"])
    let work = flags["--work"] ?? "", runs = flags["--runs"].flatMap { Int($0) } ?? 30
    let memoryMiB = flags["--memory"].flatMap { Int($0) } ?? 256
    guard !work.isEmpty else { fatal("--work is required") }
    let kernel = work + "/counter.elf"
    writeFile(kernel, TinyGuest.elf(code: TinyGuest.counter))
    let console = work + "/console"
    let snapshot = work + "/snapshot"

    // The source: runs until it has printed, then is snapshotted while it runs.
    let source = Machine(config: MachineConfig(kernelPath: kernel, commandLine: "count", cpuCount: 1, memoryMiB: memoryMiB,
                                               consoleOutput: openOutput(console)))
    let sourceThread = startMachine(source)
    waitForGrowth(console, from: 0)
    let saved: Double
    do {
        let start = MonotonicClock.now
        _ = try source.snapshotBlocking(to: snapshot)
        saved = MonotonicClock.milliseconds(from: start, to: MonotonicClock.now)
    } catch { fatal("cannot snapshot the counting guest: \(error)") }
    source.stop()
    sourceThread.join()

    var toRunning: [Double] = [], toOutput: [Double] = [], phases: [String: [Double]] = [:]
    for _ in 0..<runs {
        let output = openOutput(console)
        let start = MonotonicClock.now
        let restored: Machine
        do { restored = try Machine.restoring(from: snapshot, consoleOutput: output, diffable: false) } catch {
            fatal("cannot restore the counting guest: \(error)")
        }
        let report = ReportSlot()
        let thread: OSThread
        do {
            thread = try OSThread.start(name: "restored") {
                do { let r = try restored.runBlocking(); report.value.withLock { $0 = r } } catch { fatal("the restored guest failed: \(error)") }
            }
        } catch { fatal("cannot start a thread: \(error)") }
        waitForGrowth(console, from: 0)
        let firstOutput = MonotonicClock.now
        restored.stop()
        thread.join()
        close(output)
        guard let firstRun = report.value.withLock({ $0?.firstRun }) else { fatal("the restored guest did not run") }
        toRunning.append(MonotonicClock.milliseconds(from: start, to: firstRun))
        // Where the time went: Machine.restoring (the state file), then runBlocking's phases.
        var previous = start
        for phase in report.value.withLock({ $0?.phases ?? [] }) + [("first KVM_RUN", firstRun)] {
            phases[phase.name == "start" ? "state" : phase.name, default: []].append(MonotonicClock.milliseconds(from: previous, to: phase.end))
            previous = phase.end
        }
        toOutput.append(MonotonicClock.milliseconds(from: start, to: firstOutput))
    }
    print("""
        {
          "benchmark": "library-restore",
          "host_kernel": "\(hostKernelRelease())",
          "guest_memory_mib": \(memoryMiB),
          "runs": \(runs),
          "snapshot_ms": \(num(saved)),
          "counting_guest_restore_to_first_kvm_run_p50_ms": \(num(percentile(toRunning, 50))),
          "counting_guest_restore_to_first_kvm_run_p90_ms": \(num(percentile(toRunning, 90))),
          "to_running_ms": \(stats(toRunning)),
          "to_first_output_ms": \(stats(toOutput)),
          "phases_ms": {
            \(["state", "kvm", "vm", "memory", "load", "vcpus", "first KVM_RUN"].filter { phases[$0] != nil }
                .map { "\"\($0)\": \(stats(phases[$0]!))" }.joined(separator: ",\n            "))
          }
        }
        """)
}

private final class ReportSlot: Sendable { let value = Mutex<MachineRunReport?>(nil) }

private func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0, bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else { fatal("cannot write \(path)") }
    close(fd)
}

/// `path`, emptied, for a guest's console.
private func openOutput(_ path: String) -> Int32 {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { fatal("cannot open \(path)") }
    return fd
}

private func startMachine(_ machine: Machine) -> OSThread {
    do {
        return try OSThread.start(name: "source") {
            do { _ = try machine.runBlocking() } catch { fatal("the counting guest failed: \(error)") }
        }
    } catch { fatal("cannot start a thread: \(error)") }
}

/// Waits (polling every 20 µs, 20 s at most) until the file at `path` is longer than `size` bytes.
/// It sleeps between looks: on a one-CPU host a spinning wait would take the CPU from the guest.
private func waitForGrowth(_ path: String, from size: Int) {
    let deadline = MonotonicClock.now + 20_000_000_000
    var info = stat()
    while stat(path, &info) != 0 || Int(info.st_size) <= size {
        guard MonotonicClock.now < deadline else { fatal("the guest printed nothing within 20 s") }
        usleep(20)
    }
}
