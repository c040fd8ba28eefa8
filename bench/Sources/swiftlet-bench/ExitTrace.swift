import Glibc

/// Counts KVM_RUN returns to userspace (the kvm:kvm_userspace_exit tracepoint) over a command,
/// through tracefs. Both VMMs are measured the same way.
struct ExitTrace {
    let root: String

    init?() {
        for candidate in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        where access(candidate + "/events/kvm/kvm_userspace_exit/enable", W_OK) == 0 {
            root = candidate
            return
        }
        return nil
    }

    func write(_ value: String, to file: String) {
        let fd = open(root + "/" + file, O_WRONLY | O_TRUNC)
        guard fd >= 0 else { return }
        var v = value
        v.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    /// Runs `body` with the tracepoint on; returns the number of events recorded.
    func count(_ body: () -> Void) -> Int {
        write("0", to: "tracing_on")
        write("", to: "trace")
        write("1", to: "events/kvm/kvm_userspace_exit/enable")
        write("1", to: "tracing_on")
        body()
        write("0", to: "tracing_on")
        write("0", to: "events/kvm/kvm_userspace_exit/enable")
        var total = 0
        var cpu = 0
        while let stats = readFile(root + "/per_cpu/cpu\(cpu)/stats") {
            for line in stats.split(separator: "\n") where line.hasPrefix("entries:") || line.hasPrefix("overrun:") {
                total += kib(line)
            }
            cpu += 1
        }
        return total
    }
}
