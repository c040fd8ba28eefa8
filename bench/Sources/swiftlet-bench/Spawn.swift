import CLinux
import Glibc

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
    /// Everything written to descriptor 3 (with `.descriptor3`; empty otherwise).
    var markerStream: [UInt8]
}

/// Where a run's marker arrives: its stdout, its stderr, or a pipe of its own on descriptor 3
/// (for QEMU's isa-debugcon, so that nothing else QEMU prints can be taken for the marker).
enum MarkerStream { case stdout, stderr, descriptor3 }

/// Spawns `arguments`, watching `markerOn` for `marker` (bytes), and waits for the exit.
func observe(_ arguments: [String], marker: [UInt8], markerOn stream: MarkerStream = .stderr, guestMemoryBytes: Int) -> Observation {
    // Pipes for stdout, stderr and, for `.descriptor3`, the marker's own.
    var pipes: [[Int32]] = []
    for _ in 0..<(stream == .descriptor3 ? 3 : 2) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { fatal("cannot make a pipe: errno \(errno)") }
        pipes.append(fds)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    for (target, fds) in pipes.enumerated() { posix_spawn_file_actions_adddup2(&actions, fds[1], Int32(target) + 1) }
    // The originals go (but a descriptor 3 that the marker pipe now occupies).
    for fd in pipes.joined() where !(stream == .descriptor3 && fd == 3) { posix_spawn_file_actions_addclose(&actions, fd) }
    let argv = arguments.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid = pid_t()
    let start = swiftlet_monotonic_ns()
    let spawned = posix_spawn(&pid, arguments[0], &actions, nil, argv, environ)
    posix_spawn_file_actions_destroy(&actions)
    for fds in pipes { close(fds[1]) }
    guard spawned == 0 else { fatal("cannot start \(arguments[0]): errno \(spawned)") }

    var received: [[UInt8]] = Array(repeating: [], count: pipes.count)
    let watched = stream == .stdout ? 0 : stream == .stderr ? 1 : 2
    var markerAt: UInt64?
    var rssAtMarker: (Int, Int)?
    var fds = pipes.map { pollfd(fd: $0[0], events: Int16(POLLIN), revents: 0) }
    var open = fds.count
    var buffer = [UInt8](repeating: 0, count: 65536)
    while open > 0 {
        _ = poll(&fds, nfds_t(fds.count), -1)
        for i in fds.indices where fds[i].fd >= 0 && fds[i].revents != 0 {
            let n = buffer.withUnsafeMutableBytes { read(fds[i].fd, $0.baseAddress, $0.count) }
            if n <= 0 { close(fds[i].fd); fds[i].fd = -1; open -= 1; continue }
            received[i] += buffer[0..<n]
            if markerAt == nil, i == watched, contains(received[i], marker) {
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
        stdout: String(decoding: received[0], as: UTF8.self), stderr: String(decoding: received[1], as: UTF8.self),
        markerStream: stream == .descriptor3 ? received[2] : [])
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
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        bytes += buffer[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

func fatal(_ message: String) -> Never {
    var line = "swiftlet-bench: " + message + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    exit(1)
}
