import CLinux
import Glibc
import Synchronization

/// How Swiftlet's processes confine themselves once their setup is done: a VMM process (a
/// machine's, or `swiftlet run`'s) before its guest first runs, `swiftlet-pull` before it talks
/// to a registry. Each gets a seccomp allow-list filter (`SeccompFilter`) on all its threads,
/// PR_SET_NO_NEW_PRIVS, and a bound on its descriptors; a call outside the list ends the process
/// with "swiftlet: seccomp: forbidden system call N (name)" on standard error (the machine's
/// `vmm.log` for a machine).
///
/// `SWIFTLET_SECCOMP` in the environment: unset or `on`, the filter as above; `off`, no filter
/// (for debugging; the rest still applies); `log`, calls outside the list are allowed and the
/// kernel logs them (audit, `dmesg`), for finding what a change needs.
public enum Confinement {
    /// Which list a process gets.
    public enum Role: String, Sendable {
        case vmm
        case pull
    }

    public enum Mode: String, Sendable {
        case on, off, log
    }

    /// The mode `SWIFTLET_SECCOMP` asks for.
    public static func mode(_ value: String? = getenv("SWIFTLET_SECCOMP").map { String(cString: $0) }) throws(SwiftletError) -> Mode {
        guard let value, !value.isEmpty else { return .on }
        guard let mode = Mode(rawValue: value) else {
            throw SwiftletError(.invalidArgument, "SWIFTLET_SECCOMP=\(value): expected on, off or log")
        }
        return mode
    }

    /// Set once this process is confined: a process confines itself once (`swiftlet run` may run
    /// a second machine after a first, under the same filter).
    private static let confined = Atomic<Bool>(false)

    /// The most descriptors a confined process may have open (RLIMIT_NOFILE, soft and hard):
    /// a machine's disks, eventfds, sockets and its guest's vsock connections stay far below.
    public static let descriptorLimit: rlim_t = 4096

    /// Confines this process for `role` (once; later calls do nothing): no new privileges,
    /// capabilities dropped when it has any (on this thread, and so on the threads it starts
    /// afterwards), at most `descriptorLimit` descriptors, files no larger than `largestFile`
    /// bytes when given, and the seccomp filter on every thread.
    /// Call it where setup (opening files and devices, mapping memory) is done and before
    /// untrusted input (the guest, a registry) gets a say.
    public static func confine(_ role: Role, largestFile: UInt64? = nil, descriptors: rlim_t = descriptorLimit) throws(SwiftletError) {
        guard !confined.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let mode = try mode()
        try systemCall("prctl(PR_SET_NO_NEW_PRIVS)") { swiftlet_set_no_new_privileges() }
        try dropCapabilities()
        try limitDescriptors(descriptors)
        if let largestFile { try limitFileSize(largestFile) }
        guard mode != .off else { return }
        try Seccomp.reportForbiddenCalls()
        try Seccomp.install(program: compiled(role.rawValue, mode) { filter(role, defaultAction: $0) })
        filterMode.withLock { $0 = mode }
        // A test hook: a call the filter refuses, made once it is in place (the process ends
        // with the message above). Harmless without the filter: personality(0xffffffff) only asks.
        if getenv("SWIFTLET_SECCOMP_TEST_FORBIDDEN_CALL") != nil { _ = swiftlet_forbidden_call_for_tests() }
    }

    /// Drops the calling thread's capabilities, when it has any: threads it starts afterwards have
    /// none either. Capabilities belong to threads, not processes, and `confine` runs on the
    /// machine's thread: a process that becomes a VMM (a machine's `machine serve`, a confined
    /// `run`) calls this first, on its main thread, before it starts any other, so no thread of
    /// it keeps a root's capabilities. Files it opens are its user's own (a root's files are
    /// root's), and helpers it executes (passt, mkfs) get a root's capabilities back from execve.
    public static func dropCapabilities() throws(SwiftletError) {
        if swiftlet_has_capabilities() == 1 {
            try systemCall("capset (dropping capabilities)") { swiftlet_drop_capabilities() }
        }
    }

    /// Sets RLIMIT_NOFILE, soft and hard, to `count` (or to the hard limit if that is lower).
    static func limitDescriptors(_ count: rlim_t = descriptorLimit) throws(SwiftletError) {
        var limit = rlimit()
        try systemCall("getrlimit(RLIMIT_NOFILE)") { getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) }
        let bound = min(limit.rlim_max, count)
        limit = rlimit(rlim_cur: bound, rlim_max: bound)
        try systemCall("setrlimit(RLIMIT_NOFILE)") { setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) }
    }

    /// Sets RLIMIT_FSIZE, soft and hard, to `bytes` (or to the hard limit if that is lower), and
    /// ignores SIGXFSZ: a write past the limit fails with EFBIG (an error the writer reports)
    /// instead of killing the process.
    static func limitFileSize(_ bytes: UInt64) throws(SwiftletError) {
        var limit = rlimit()
        try systemCall("getrlimit(RLIMIT_FSIZE)") { getrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit) }
        let bound = min(limit.rlim_max, rlim_t(bytes))
        limit = rlimit(rlim_cur: bound, rlim_max: bound)
        try systemCall("setrlimit(RLIMIT_FSIZE)") { setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit) }
        signal(SIGXFSZ, SIG_IGN)
    }

    /// Whether this process confined itself with a filter (mode `on` or `log`), and which.
    private static let filterMode = Mutex<Mode?>(nil)

    /// Adds the vCPU threads' own, narrower filter to the calling thread (filters stack: a call
    /// must pass both), when this process confined itself with a filter; otherwise does nothing
    /// (a unit test's machine, a program that embeds the library). A vCPU thread runs the guest
    /// and emulates its devices: it reads and writes descriptors it has, maps memory and talks
    /// to KVM, and needs no file by name, no listening socket and no new descriptor but a Unix
    /// socket for vsock forwarding (and threads: a device's event loop may start on the vCPU
    /// thread that activates the device, and then adds its own filter).
    public static func confineVCPUThread() throws(SwiftletError) {
        _ = try confineThread("vcpu", vcpuFilter, "a vCPU thread")
    }

    /// Adds the device threads' filter to the calling thread (a virtio device's event loop,
    /// which moves the guest's packets between its queues and host sockets), like
    /// `confineVCPUThread`: what a vCPU thread may do less KVM (only KVM_IRQ_LINE, the device's
    /// interrupt), threads and filters. A device thread started by a vCPU thread has both filters.
    /// Returns false, doing nothing, while this process has not confined itself: a device's thread
    /// may start before that (at a restore), and calls again (`DeviceThreadConfinement`).
    public static func confineDeviceThread() throws(SwiftletError) -> Bool {
        try confineThread("device", deviceFilter, "a device thread")
    }

    /// Whether it installed the filter (false: this process has no filter, yet or at all).
    private static func confineThread(_ name: String, _ filter: (SeccompFilter.Action) -> SeccompFilter, _ what: String) throws(SwiftletError) -> Bool {
        guard let mode = filterMode.withLock({ $0 }) else { return false }
        let program = compiled(name, mode, filter).map { sock_filter(code: $0.code, jt: $0.jt, jf: $0.jf, k: $0.k) }
        let result = program.withUnsafeBufferPointer { swiftlet_seccomp_install($0.baseAddress, UInt16($0.count), 0) }
        if result != 0 { throw SwiftletError.system("seccomp(SECCOMP_SET_MODE_FILTER) on \(what)", errno: currentErrno) }
        return true
    }

    /// Compiled filters by name and mode: each is compiled once per process, and `prepare`
    /// compiles them ahead (some milliseconds under emulation, which a migration's pause
    /// would otherwise wait for).
    private static let programs = Mutex<[String: [BPFInstruction]]>([:])

    private static func compiled(_ name: String, _ mode: Mode, _ filter: (SeccompFilter.Action) -> SeccompFilter) -> [BPFInstruction] {
        let key = name + " " + mode.rawValue
        if let program = programs.withLock({ $0[key] }) { return program }
        let program = filter(mode == .log ? .log : .trap).program()
        programs.withLock { $0[key] = program }
        return program
    }

    /// Compiles the filters a process of `role` and its threads will install, for the mode
    /// `SWIFTLET_SECCOMP` asks for, so that `confine` and the threads' filters only install them.
    /// Call it where the process waits anyway (a machine arriving by migration, during its rounds).
    public static func prepare(_ role: Role) {
        guard let mode = try? mode(), mode != .off else { return }
        _ = compiled(role.rawValue, mode) { filter(role, defaultAction: $0) }
        guard role == .vmm else { return }
        _ = compiled("vcpu", mode, vcpuFilter)
        _ = compiled("device", mode, deviceFilter)
        _ = compiled("file server", mode, fileServerFilter)
    }

    /// The filter a process of `role` gets. The hot calls come first (a rule that does not
    /// match costs one instruction; the first ioctl rule is KVM_RUN).
    public static func filter(_ role: Role, defaultAction: SeccompFilter.Action = .trap) -> SeccompFilter {
        switch role {
        case .vmm:
            SeccompFilter(rules: ioctlRules(vmmIoctls) + rules(common + vmmCalls + fileServerCalls) + prctlRules + threadRules + vmmSocketRules + seccompRules
                            + helperRules,
                          defaultAction: defaultAction)
        case .pull:
            SeccompFilter(rules: ioctlRules(terminalIoctls) + rules(common + pullCalls + ["socket"]) + prctlRules + threadRules,
                          defaultAction: defaultAction)
        }
    }

    /// The vCPU threads' filter, on top of the VMM's.
    public static func vcpuFilter(defaultAction: SeccompFilter.Action = .trap) -> SeccompFilter {
        SeccompFilter(rules: ioctlRules(vmmIoctls) + rules(vcpuCalls) + prctlRules + threadRules + vmmSocketRules + seccompRules
                        + refusedOpens,
                      defaultAction: defaultAction)
    }

    /// The device threads' filter, on top of the VMM's.
    public static func deviceFilter(defaultAction: SeccompFilter.Action = .trap) -> SeccompFilter {
        SeccompFilter(rules: ioctlRules(deviceIoctls) + rules(vcpuCalls) + prctlRules + vmmSocketRules + refusedOpens,
                      defaultAction: defaultAction)
    }

    /// A file server thread's filter (virtio-fs), on top of the VMM's: a device thread's calls
    /// and the file operations it does for the guest beneath its shared directories.
    public static func fileServerFilter(defaultAction: SeccompFilter.Action = .trap) -> SeccompFilter {
        SeccompFilter(rules: ioctlRules(deviceIoctls) + rules(fileServerCalls + threadCalls) + prctlRules, defaultAction: defaultAction)
    }

    /// Adds the file server threads' filter to the calling thread, as `confineDeviceThread`.
    public static func confineFileServerThread() throws(SwiftletError) -> Bool {
        try confineThread("file server", fileServerFilter, "a file server thread")
    }

    /// What a thread that serves from its own descriptors needs besides: I/O on them, memory,
    /// waiting, its own end (no sockets, no KVM but its interrupt, no threads).
    static let threadCalls = [
        "read", "write", "pread64", "pwrite64", "futex", "poll", "ppoll", "readv", "writev", "preadv", "pwritev", "lseek", "close", "fcntl",
        "fsync", "fdatasync", "fallocate", "ftruncate", "fstat", "newfstatat",
        "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "mincore",
        "set_robust_list", "rseq", "sched_yield", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "tkill",
        "getpid", "gettid", "getrandom", "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
        "restart_syscall", "exit", "exit_group",
    ]

    /// What a file server does for its guest (`ConfinedFiles`): files by descriptor and by one
    /// name beneath a directory it holds, reopened through /proc/self/fd, extended attributes.
    static let fileServerCalls = [
        "openat", "openat2", "newfstatat", "fstat", "fstatfs", "getdents64", "readlinkat", "mkdirat", "symlinkat",
        "unlinkat", "renameat2", "linkat", "fchmodat", "fchownat", "utimensat",
        "getxattr", "setxattr", "listxattr", "removexattr",
    ]

    /// A vCPU or device thread opens no file, but glibc's malloc may, on any thread, once per
    /// process: the first time a thread's own arena gives memory back, it reads
    /// /proc/sys/vm/overcommit_memory (to choose between madvise and a PROT_NONE mapping), and a
    /// thread that freed a lot (a guest that wrote 100 MiB to its console) gets there. An open on
    /// these threads fails with EACCES instead of ending the process: no file is opened either
    /// way, and malloc takes the failure as "overcommit is not strict" and keeps it.
    static let refusedOpens: [SeccompFilter.Rule] = ["openat", "open"].map {
        SeccompFilter.Rule($0, action: .errno(EACCES))!
    }

    /// A device thread's ioctls: its interrupt, and non-blocking mode and queued bytes of its sockets.
    static let deviceIoctls: [UInt32] = [UInt32(truncatingIfNeeded: SWIFTLET_KVM_IRQ_LINE), UInt32(FIONBIO), UInt32(FIONREAD)]

    static func rules(_ names: [String]) -> [SeccompFilter.Rule] {
        names.map { name in
            guard let rule = SeccompFilter.Rule(name) else { preconditionFailure("no x86_64 system call named \(name)") }
            return rule
        }
    }

    /// ioctl with one of `requests` (the kernel reads the request as 32 bits).
    static func ioctlRules(_ requests: [UInt32]) -> [SeccompFilter.Rule] {
        requests.map { SeccompFilter.Rule("ioctl", conditions: [.equals(argument: 1, $0)])! }
    }

    /// The requests a VMM makes (every KVM request CLinux exports, terminals, FIO*, BLKGETSIZE64), KVM_RUN first.
    static let vmmIoctls: [UInt32] = {
        var count: Int32 = 0
        let pointer = swiftlet_vmm_ioctl_requests(&count)
        let all = (0..<Int(count)).map { UInt32(truncatingIfNeeded: pointer![$0]) }
        let hot = [SWIFTLET_KVM_RUN, SWIFTLET_KVM_IRQ_LINE].map { UInt32(truncatingIfNeeded: $0) }
        return hot + all.filter { !hot.contains($0) }
    }()

    /// What the pull helper asks of a terminal or a socket.
    static let terminalIoctls: [UInt32] = [UInt32(TCGETS), UInt32(TIOCGWINSZ), UInt32(FIONREAD), UInt32(FIONBIO), UInt32(FIOCLEX)]

    /// prctl only to name threads (Dispatch, NIO) and read the name.
    static let prctlRules: [SeccompFilter.Rule] = [15 /* PR_SET_NAME */, 16 /* PR_GET_NAME */].map {
        SeccompFilter.Rule("prctl", conditions: [.equals(argument: 0, $0)])!
    }

    /// What any Swift program of Swiftlet's needs once running: memory, threads and their
    /// synchronization, signals, time, descriptors it already has, files (the VMM writes
    /// snapshots, consoles and logs; the pull helper writes blobs), and its own exit.
    static let common = [
        // the hottest first
        "read", "write", "pread64", "pwrite64", "futex", "epoll_wait", "epoll_pwait", "poll", "ppoll",
        "readv", "writev", "preadv", "pwritev", "preadv2", "pwritev2",
        "lseek", "close", "dup", "dup2", "dup3", "fcntl", "pipe2", "select", "pselect6",
        "epoll_create", "epoll_create1", "epoll_ctl", "eventfd2", "signalfd4",
        "sendfile", "copy_file_range", "fsync", "fdatasync", "ftruncate", "fallocate", "flock",
        // files by name (inside the directories the process was given)
        "openat", "open", "newfstatat", "fstat", "stat", "lstat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2",
        "readlink", "readlinkat", "getdents64", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat",
        "rmdir", "fchmod", "fchmodat", "utimensat", "getcwd", "umask",
        // memory
        "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "mincore", "membarrier",
        // threads, synchronization, signals
        "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield", "sched_getaffinity",
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "rt_sigsuspend", "sigaltstack", "tgkill", "tkill",
        "setpriority", "getpriority",
        "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getrandom", "uname",
        "getrlimit", "prlimit64", "getrusage", "sysinfo", "restart_syscall",
        // time
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
        "timerfd_create", "timerfd_settime", "timerfd_gettime",
        // the end
        "exit", "exit_group",
    ]

    /// A vCPU thread's: the guest's exits and the devices it emulates on the way (reads and
    /// writes of disks and sockets it has, eventfds, entropy; a guest's vsock connection becomes
    /// a socket pair or a connected Unix socket, and the vsock device's event loop a thread that
    /// inherits this filter), memory, waiting, its own end.
    static let vcpuCalls = [
        "socketpair", "eventfd2", "sched_getaffinity", "set_tid_address",
        "read", "write", "pread64", "pwrite64", "futex", "poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_ctl",
        "readv", "writev", "preadv", "pwritev", "preadv2", "pwritev2", "lseek", "close", "fcntl",
        "fsync", "fdatasync", "fallocate", "ftruncate", "copy_file_range", "sendfile", "fstat", "newfstatat",
        "connect", "sendmsg", "recvmsg", "sendto", "recvfrom", "shutdown", "getsockopt", "setsockopt",
        "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "mincore",
        "set_robust_list", "rseq", "sched_yield", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "tkill",
        "getpid", "gettid", "getrandom", "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
        "restart_syscall", "exit", "exit_group",
    ]

    /// The VMM's own: sockets it already has or accepts (the control socket, vsock forwarding to
    /// Unix sockets) and the descriptors it passes (SCM_RIGHTS).
    static let vmmCalls = [
        "accept", "accept4", "connect", "bind", "listen", "shutdown", "recvmsg", "sendmsg", "recvfrom", "sendto",
        "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair",
    ]

    /// The registry helper's: TCP and TLS to registries, name resolution.
    static let pullCalls = [
        "accept", "accept4", "connect", "bind", "listen", "shutdown", "recvmsg", "sendmsg", "recvfrom", "sendto",
        "recvmmsg", "sendmmsg", "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair",
    ]

    /// Threads, but no processes: clone only with CLONE_THREAD (what pthread_create passes),
    /// and clone3 (whose flags sit in memory a filter cannot read) fails with ENOSYS, on which
    /// glibc's pthread_create falls back to clone.
    static let threadRules: [SeccompFilter.Rule] = [
        SeccompFilter.Rule("clone", conditions: [.hasBits(argument: 0, 0x0001_0000 /* CLONE_THREAD */)])!,
        SeccompFilter.Rule("clone3", action: .errno(ENOSYS))!,
    ]

    /// The VMM makes Unix sockets only (its control socket and vsock forwarding).
    static let vmmSocketRules: [SeccompFilter.Rule] = [
        SeccompFilter.Rule("socket", conditions: [.equals(argument: 0, UInt32(AF_UNIX))])!,
    ]

    /// A VMM process starts its helpers (passt, `HelperProcess`) before it confines itself, and
    /// afterwards only ends and reaps them: the thread that started a helper waits for it
    /// (waitid without reaping, then wait4), and `HelperProcess.stop` sends SIGKILL, to that
    /// one process (kill with another signal, or to a group, stays refused; forking and
    /// executing stay refused too).
    static let helperRules: [SeccompFilter.Rule] = [
        SeccompFilter.Rule("waitid", conditions: [.equals(argument: 0, 1 /* P_PID */)])!,
        SeccompFilter.Rule("wait4")!,
        SeccompFilter.Rule("kill", conditions: [.equals(argument: 1, UInt32(SIGKILL))])!,
    ]

    /// A vCPU thread adds its own filter once the process's is in place (a filter only ever
    /// takes away: allowing this gives nothing back).
    static let seccompRules: [SeccompFilter.Rule] = [
        SeccompFilter.Rule("seccomp", conditions: [.equals(argument: 0, 1 /* SECCOMP_SET_MODE_FILTER */)])!,
    ]
}

/// A device thread's side of `Confinement.confineDeviceThread`: `apply()` before each batch of
/// guest work adds the device filter as soon as the process has confined itself. A thread that
/// starts before then (a device restored from a snapshot starts its loop while the machine is
/// built) has no guest work until the guest runs, and the process confines itself before that.
public struct DeviceThreadConfinement: ~Copyable {
    /// Which filter the thread gets: a device thread's, or a file server thread's (virtio-fs,
    /// `Confinement.confineFileServerThread`).
    public enum Kind: Sendable { case device, fileServer }

    private let kind: Kind
    private var installed = false

    public init(_ kind: Kind = .device) { self.kind = kind }

    public mutating func apply() throws(SwiftletError) {
        guard !installed else { return }
        installed = try kind == .device ? Confinement.confineDeviceThread() : Confinement.confineFileServerThread()
    }
}
