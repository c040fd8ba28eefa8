import Glibc
import KVM
import SwiftletSystem
import Synchronization
import Testing
import TestSupport
@testable import VMM

/// What `asyncAPIRunsOffTheCooperativePool` shares with its machines' vCPU threads and its watchdog.
private final class PoolProbe: Sendable {
    let booted = Mutex(0), watchdogFired = Mutex(false), finished = Mutex(false)
    let firstStart = Mutex<UInt64?>(nil)
}

/// Boots a tiny 64-bit ELF guest through the whole VMM (loader, boot state, devices, vCPU thread).
struct TinyMachine {
    let dir = TemporaryDirectory()
    var config: MachineConfig
    let outputRead: Int32

    init(code: [UInt8], linuxNote: Bool = false, cpus: Int = 1) {
        let kernel = dir.write("guest.elf", TinyGuest.elf(code: code, address: 0x100000, linuxNote: linuxNote))
        var fds: [Int32] = [0, 0]
        _ = closeOnExecPipe(&fds)
        outputRead = fds[0]
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        config = MachineConfig(kernelPath: kernel, initrdPath: nil, commandLine: "test", cpuCount: cpus, memoryMiB: 64,
                               consoleOutput: fds[1], consoleInput: nil)
    }

    func run(hypervisor: @escaping HypervisorProvider = Machine.defaultHypervisor) throws -> (MachineRunReport, String) {
        let report = try Machine(config: config, hypervisor: hypervisor).runBlocking()
        close(config.consoleOutput!)
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(outputRead, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        close(outputRead)
        return (report, String(decoding: bytes, as: UTF8.self))
    }
}

@Suite(.enabled(if: TestHost.hasKVM, "needs /dev/kvm")) struct MachineTests {
    @Test func guestPrintsSignalsTheMarkerAndResets() throws {
        let (report, output) = try TinyMachine(code: TinyGuest.hello("hi\n", ending: TinyGuest.i8042Reset)).run()
        #expect(report.exit == .reset)
        #expect(output == "hi\n")
        let marker = try #require(report.bootMarker)
        #expect(marker > report.processStart && marker <= report.end)
        #expect(report.exitsToUserspace >= 5)
        #expect(report.peakResidentBytes > 0)
    }

    @Test func acpiPowerOffIsACleanExit() throws {
        let (report, output) = try TinyMachine(code: TinyGuest.hello("bye", ending: TinyGuest.acpiPowerOff)).run()
        #expect(report.exit == .powerOff)
        #expect(report.exit.isClean)
        #expect(output == "bye", "a partial line is flushed at exit")
    }

    @Test func pvpanicIsAGuestPanic() throws {
        let (report, _) = try TinyMachine(code: TinyGuest.hello("", ending: TinyGuest.pvpanic)).run()
        #expect(report.exit == .guestPanic)
        #expect(!report.exit.isClean)
    }

    @Test func tripleFaultIsReportedWithItsRIP() throws {
        let code = TinyGuest.write([123], port: 0x3F0) + TinyGuest.ud2
        let (report, _) = try TinyMachine(code: code).run()
        guard case .tripleFault(let cpu, let rip) = report.exit else { Issue.record("got \(report.exit)"); return }
        #expect(cpu == 0)
        // Intel keeps the faulting RIP; AMD's KVM resets the vCPU on shutdown, and then none is named.
        if let rip {
            #expect(rip >= 0x100000 && rip < 0x100000 + UInt64(code.count))
            #expect(report.exit.description.contains("triple-faulted at rip 0x"))
        } else {
            #expect(KVMBackend.detect() == .hardware(vendor: "AMD-V"), "only AMD's KVM loses the faulting RIP")
            #expect(!report.exit.description.contains(" at rip"))
        }
        #expect(report.exit.description.contains("triple-faulted"))
    }

    @Test func secondaryCPUsWaitForSIPIWhileTheBootCPURuns() throws {
        let (report, output) = try TinyMachine(code: TinyGuest.hello("smp", ending: TinyGuest.i8042Reset), cpus: 2).run()
        #expect(report.exit == .reset)
        #expect(output == "smp")
    }

    /// `run()` keeps a machine's blocking work (the console loop, the vCPUs' KVM_RUN) on threads of
    /// its own: with more machines running than Swift's cooperative pool has threads, each on a
    /// `swiftlet-main` thread, a task still sleeps and wakes. Were `run()` to block a pooled thread,
    /// the machines would fill the pool and only the watchdog stopping them could end the wait.
    @Test func asyncAPIRunsOffTheCooperativePool() async throws {
        let count = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) + 1
        let guests = (0..<count).map { _ in TinyMachine(code: TinyGuest.hello("async\n", ending: TinyGuest.spin)) }
        defer { for guest in guests { close(guest.config.consoleOutput!); close(guest.outputRead) } }
        let machines = guests.map { Machine(config: $0.config) }
        let state = PoolProbe()
        // The 60 s count from when the first machine's task starts: other tests running beside this
        // one may hold the pool's threads for a while before that, which says nothing about run().
        let watchdog = try OSThread.start(name: "test-watchdog") {
            while !state.finished.withLock({ $0 }) {
                if let started = state.firstStart.withLock({ $0 }), MonotonicClock.now > started + 60_000_000_000 {
                    state.watchdogFired.withLock { $0 = true }
                    for machine in machines { machine.stop() }
                    return
                }
                usleep(10_000)
            }
        }
        defer { state.finished.withLock { $0 = true }; watchdog.join() }
        try await withThrowingTaskGroup(of: MachineRunReport.self) { group in
            for machine in machines {
                group.addTask {
                    state.firstStart.withLock { $0 = $0 ?? MonotonicClock.now }
                    return try await machine.run(onBootMarker: { _ in state.booted.withLock { $0 += 1 } })
                }
            }
            while state.booted.withLock({ $0 }) < count && !state.watchdogFired.withLock({ $0 }) {
                try await Task.sleep(nanoseconds: 10_000_000)
            }
            #expect(!state.watchdogFired.withLock { $0 }, "the cooperative pool was blocked while \(count) machines ran")
            let names = (OwnedFileDescriptor.directoryEntries("/proc/self/task") ?? []).compactMap { task in
                try? OwnedFileDescriptor.readSmallTextFile("/proc/self/task/\(task.name)/comm")
            }
            #expect(names.filter { $0 == "swiftlet-main\n" }.count >= count, "each run on a swiftlet-main thread: \(names)")
            for machine in machines { machine.stop() }
            for try await report in group { #expect(report.exit == .stopped) }
        }
    }

    /// On a PVM host a Linux kernel is refused up front; elsewhere the same image just runs.
    @Test func linuxKernelOnPVMIsRefusedWithAnExplanation() throws {
        let machine = TinyMachine(code: TinyGuest.hello("", ending: TinyGuest.i8042Reset), linuxNote: true)
        if TestHost.isPVM {
            #expect { try machine.run() } throws: {
                let e = $0 as! SwiftletError
                return e.code == .unsupported && e.message.contains("PVM") && e.message.contains("hardware KVM")
                    && e.message.contains("PVM-enabled guest kernel")
            }
            var allowed = machine
            allowed.config.allowPVM = true
            #expect(try allowed.run().0.exit == .reset)
        } else {
            #expect(try machine.run().0.exit == .reset)
        }
    }

    @Test func badInputsFailBeforeTheGuestStarts() throws {
        var machine = TinyMachine(code: TinyGuest.hello("", ending: TinyGuest.i8042Reset))
        machine.config.kvmPath = "/nonexistent/kvm"
        #expect { try machine.run() } throws: { ($0 as! SwiftletError).message.contains("does not exist") }

        machine = TinyMachine(code: TinyGuest.spin)
        machine.config.kernelPath = machine.dir.write("junk", Array(repeating: 0x41, count: 4096))
        #expect { try machine.run() } throws: { ($0 as! SwiftletError).message.contains("neither an ELF vmlinux nor a bzImage") }

        machine = TinyMachine(code: TinyGuest.spin)
        machine.config.initrdPath = machine.dir.sparse("huge.cpio", size: 100 << 20)
        #expect { try machine.run() } throws: { ($0 as! SwiftletError).message.contains("does not fit in guest memory") }

        machine = TinyMachine(code: TinyGuest.spin)
        machine.config.cpuCount = 100_000
        #expect { try machine.run() } throws: { ($0 as! SwiftletError).message.contains("--cpus 100000") }
    }
}

@Suite struct MachineConfigTests {
    func config(cpus: Int = 1, memory: Int = 256) -> MachineConfig {
        MachineConfig(kernelPath: "k", cpuCount: cpus, memoryMiB: memory)
    }

    @Test func rejectsZeroAndOutOfRangeValues() {
        #expect { try config(cpus: 0).validate() } throws: { ($0 as! SwiftletError).message == "--cpus must be at least 1 (got 0)" }
        #expect { try config(memory: 0).validate() } throws: { ($0 as! SwiftletError).message.contains("--memory must be at least 32 MiB") }
        #expect { try config(cpus: 300).validate() } throws: { ($0 as! SwiftletError).message.contains("more than Swiftlet supports") }
        #expect { try config(cpus: 8).validate(maxVCPUs: 4, hostMemoryBytes: nil) } throws: {
            ($0 as! SwiftletError).message == "--cpus 8 is more than this host's KVM allows per VM (4)"
        }
        #expect { try config(memory: 4096).validate(maxVCPUs: 4, hostMemoryBytes: 1 << 30) } throws: {
            ($0 as! SwiftletError).message.contains("more than this host's 1024 MiB of RAM")
        }
        #expect(throws: Never.self) { try config(cpus: 8, memory: 512).validate(maxVCPUs: 8, hostMemoryBytes: 1 << 30) }
    }
}
