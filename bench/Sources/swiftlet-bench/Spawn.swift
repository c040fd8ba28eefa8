import CLinux
import Glibc
import SwiftletSystem

/// One run of a VMM process, observed from outside: when it started, when the guest's boot marker
/// reached us, when it exited, and what it cost.
struct Observation {
    var markerMs: Double?
    var exitMs: Double
    var status: Int32
    /// CPU time of the VMM itself (user + system, minus time spent running the guest), ms.
    var vmmCPUMs: Double
    /// Peak RSS (getrusage), KiB.
    var peakRSSKiB: Int
    /// At the marker: resident KiB of the process, and of its guest RAM mapping.
    var rssAtMarkerKiB: Int?
    var guestRSSAtMarkerKiB: Int?
    var stdout: String
    var stderr: String
}

/// Spawns `arguments`, watching stderr (or stdout, with `markerOnStdout`) for `marker` (bytes),
/// and waits for the exit.
func observe(_ arguments: [String], marker: [UInt8], markerOnStdout: Bool = false, guestMemoryBytes: Int) -> Observation {
    let outPipe: PipeEnds, errPipe: PipeEnds
    do {
        outPipe = try OwnedFileDescriptor.pipe()
        errPipe = try OwnedFileDescriptor.pipe()
    } catch {
        fatal("\(error)")
    }
    let outRead = outPipe.readEnd, errRead = errPipe.readEnd
    var pid = pid_t()
    let start = swiftlet_monotonic_ns()
    do {
        // The write ends go to the child as its stdout and stderr, and are closed here after the
        // spawn, so the reads below end when the child does.
        let outWrite = outPipe.writeEnd, errWrite = errPipe.writeEnd
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outWrite.rawValue, 1)
        posix_spawn_file_actions_adddup2(&actions, errWrite.rawValue, 2)
        let argv = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let spawned = posix_spawn(&pid, arguments[0], &actions, nil, argv, environ)
        posix_spawn_file_actions_destroy(&actions)
        guard spawned == 0 else { fatal("cannot start \(arguments[0]): errno \(spawned)") }
    }

    var out: [UInt8] = [], err: [UInt8] = []
    var markerAt: UInt64?
    var rssAtMarker: (Int, Int)?
    // The pipes still open (-1 once one reached its end).
    var reading = [outRead.rawValue, errRead.rawValue]
    var buffer = [UInt8](repeating: 0, count: 65536)
    while reading.contains(where: { $0 >= 0 }) {
        let ready = (try? Poll.wait(reading)) ?? [false, false]
        for i in 0..<2 where ready[i] {
            let n = (try? buffer.withMutableBytes { raw throws(SwiftletError) in
                try OwnedFileDescriptor.readSome(fd: reading[i], into: raw, what: "the child's output")
            }) ?? 0
            if n <= 0 { reading[i] = -1; continue }
            if i == 0 { out += buffer[0..<n] } else { err += buffer[0..<n] }
            if markerAt == nil, i == (markerOnStdout ? 0 : 1), contains(markerOnStdout ? out : err, marker) {
                markerAt = swiftlet_monotonic_ns()
                rssAtMarker = residentKiB(pid: pid, guestMemoryBytes: guestMemoryBytes)
            }
        }
    }
    // Read the zombie's CPU accounting before reaping it.
    var info = siginfo_t()
    _ = waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT)
    let end = swiftlet_monotonic_ns()
    let cpu = vmmCPUMilliseconds(pid: pid)
    var status: Int32 = 0
    var usage = rusage()
    _ = wait4(pid, &status, 0, &usage)
    let exitCode: Int32 = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    return Observation(
        markerMs: markerAt.map { Double($0 - start) / 1e6 }, exitMs: Double(end - start) / 1e6, status: exitCode,
        vmmCPUMs: cpu, peakRSSKiB: usage.ru_maxrss, rssAtMarkerKiB: rssAtMarker?.0, guestRSSAtMarkerKiB: rssAtMarker?.1,
        stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self))
}

func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard needle.count <= haystack.count else { return false }
    for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] {
        if Array(haystack[i..<i + needle.count]) == needle { return true }
    }
    return false
}

/// utime + stime - guest_time of a (zombie) process, from /proc/PID/stat, in ms.
func vmmCPUMilliseconds(pid: pid_t) -> Double {
    guard let stat = readFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return 0 }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    // Fields after the command: state is #3 overall, so overall field N is fields[N - 3].
    func field(_ n: Int) -> Double { fields.count > n - 3 ? Double(fields[n - 3]) ?? 0 : 0 }
    let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
    return (field(14) + field(15) - field(43)) / ticks * 1000
}

/// (total resident KiB, resident KiB of the mapping that holds guest RAM) of a live process:
/// the guest RAM mapping is the private writable one of at least `guestMemoryBytes`.
func residentKiB(pid: pid_t, guestMemoryBytes: Int) -> (Int, Int)? {
    guard let smaps = readFile("/proc/\(pid)/smaps") else { return nil }
    var total = 0, guest = 0
    var currentSize = 0
    for line in smaps.split(separator: "\n") {
        if line.hasPrefix("Size:") { currentSize = kib(line) }
        else if line.hasPrefix("Rss:") {
            let rss = kib(line)
            total += rss
            if currentSize * 1024 >= guestMemoryBytes && currentSize * 1024 <= guestMemoryBytes + (64 << 20) { guest = max(guest, rss) }
        }
    }
    return (total, guest)
}

func kib(_ line: Substring) -> Int { line.split(separator: " ").compactMap { Int($0) }.first ?? 0 }

func readFile(_ path: String) -> String? {
    try? OwnedFileDescriptor.readSmallTextFile(path, limit: 256 << 20)
}

func fatal(_ message: String) -> Never {
    var line = "swiftlet-bench: " + message + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    exit(1)
}
