import CLinux
import Glibc
import SwiftletSystem
import Synchronization
import Testing

/// The seccomp filter builder: the program's shape and jumps, and what it decides for given calls,
/// found by running it on a small classic-BPF interpreter (no filter is installed on this
/// process, where it would stay on the test runner, but one, on a thread of its own that ends).
@Suite struct SeccompTests {
    /// Runs `program` the way the kernel runs a seccomp filter over `struct seccomp_data`, and
    /// returns what it returns. Fails the test on a jump out of the program or an unknown opcode.
    func evaluate(_ program: [BPFInstruction], number: UInt32, arch: UInt32 = SWIFTLET_AUDIT_ARCH_X86_64,
                  arguments: [UInt64] = [0, 0, 0, 0, 0, 0]) -> UInt32? {
        var data = [UInt8](repeating: 0, count: 64)
        func put(_ value: UInt64, at offset: Int, count: Int) {
            for i in 0..<count { data[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
        put(UInt64(number), at: 0, count: 4)
        put(UInt64(arch), at: 4, count: 4)
        for (i, argument) in arguments.enumerated() { put(argument, at: 16 + 8 * i, count: 8) }
        var a: UInt32 = 0
        var pc = 0
        while pc < program.count {
            let instruction = program[pc]
            switch instruction.code {
            case BPFInstruction.loadWord:
                let k = Int(instruction.k)
                guard k % 4 == 0, k + 4 <= data.count else { Issue.record("load outside seccomp_data at \(pc)"); return nil }
                a = (0..<4).reduce(0) { $0 | UInt32(data[k + $1]) << (8 * UInt32($1)) }
                pc += 1
            case BPFInstruction.jumpIfEqual, BPFInstruction.jumpIfGreaterOrEqual, BPFInstruction.jumpIfAnyBit:
                let taken = switch instruction.code {
                case BPFInstruction.jumpIfEqual: a == instruction.k
                case BPFInstruction.jumpIfGreaterOrEqual: a >= instruction.k
                default: a & instruction.k != 0
                }
                pc += 1 + Int(taken ? instruction.jt : instruction.jf)
            case BPFInstruction.returnConstant:
                return instruction.k
            default:
                Issue.record("unknown opcode \(instruction.code) at \(pc)")
                return nil
            }
        }
        Issue.record("the program ran off its end")
        return nil
    }

    func number(_ name: String) -> UInt32 { SeccompFilter.number(of: name)! }
    /// CLONE_THREAD (Glibc hides it without _GNU_SOURCE).
    let cloneThread: UInt32 = 0x0001_0000

    @Test func namesAndNumbersAreX86_64s() {
        #expect(SeccompFilter.number(of: "read") == 0)
        #expect(SeccompFilter.number(of: "write") == 1)
        #expect(SeccompFilter.number(of: "execve") == 59)
        #expect(SeccompFilter.number(of: "ioctl") == 16)
        #expect(SeccompFilter.number(of: "no_such_call") == nil)
        #expect(SeccompFilter.name(of: 231) == "exit_group")
        #expect(SeccompFilter.name(of: 100_000) == nil)
    }

    @Test func programStartsWithTheArchitectureAndX32Checks() {
        let program = SeccompFilter(allowing: ["read"], defaultAction: .trap).program()
        #expect(program.count == 9)
        #expect(program[0] == BPFInstruction(code: BPFInstruction.loadWord, k: 4))
        #expect(program[1] == BPFInstruction(code: BPFInstruction.jumpIfEqual, jt: 1, jf: 0, k: SWIFTLET_AUDIT_ARCH_X86_64))
        #expect(program[2] == BPFInstruction(code: BPFInstruction.returnConstant, k: SECCOMP_RET_KILL_PROCESS))
        #expect(program[3] == BPFInstruction(code: BPFInstruction.loadWord, k: 0))
        #expect(program[4] == BPFInstruction(code: BPFInstruction.jumpIfGreaterOrEqual, jt: 0, jf: 1, k: 0x4000_0000))
        #expect(program[5] == BPFInstruction(code: BPFInstruction.returnConstant, k: SECCOMP_RET_KILL_PROCESS))
        #expect(program[6] == BPFInstruction(code: BPFInstruction.jumpIfEqual, jt: 0, jf: 1, k: 0))
        #expect(program[7] == BPFInstruction(code: BPFInstruction.returnConstant, k: SECCOMP_RET_ALLOW))
        #expect(program[8] == BPFInstruction(code: BPFInstruction.returnConstant, k: SECCOMP_RET_TRAP))
    }

    @Test func actionsAreTheKernelsValues() {
        #expect(SeccompFilter.Action.allow.value == SECCOMP_RET_ALLOW)
        #expect(SeccompFilter.Action.trap.value == SECCOMP_RET_TRAP)
        #expect(SeccompFilter.Action.log.value == SECCOMP_RET_LOG)
        #expect(SeccompFilter.Action.killProcess.value == SECCOMP_RET_KILL_PROCESS)
        #expect(SeccompFilter.Action.errno(ENOSYS).value == SECCOMP_RET_ERRNO | UInt32(ENOSYS))
    }

    @Test func everyJumpLandsInsideTheProgram() {
        for role in [Confinement.Role.vmm, .pull] {
            let program = Confinement.filter(role).program()
            #expect(program.count < 4096)
            for (pc, instruction) in program.enumerated() where instruction.code & 0x07 == 0x05 {
                #expect(pc + 1 + Int(instruction.jt) < program.count && pc + 1 + Int(instruction.jf) < program.count, "\(role) \(pc): \(instruction)")
            }
            #expect(program.last?.code == BPFInstruction.returnConstant)
        }
    }

    @Test func listedCallsAreAllowedAndOthersTrapped() {
        let program = SeccompFilter(allowing: ["read", "write", "futex"], defaultAction: .trap).program()
        for name in ["read", "write", "futex"] { #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ALLOW, "\(name)") }
        for name in ["execve", "ptrace", "open", "socket"] { #expect(evaluate(program, number: number(name)) == SECCOMP_RET_TRAP, "\(name)") }
        // Another architecture's ABI, and x32's numbers, kill whatever the number.
        #expect(evaluate(program, number: 0, arch: 0x4000_0003) == SECCOMP_RET_KILL_PROCESS) // AUDIT_ARCH_I386
        #expect(evaluate(program, number: 0x4000_0000) == SECCOMP_RET_KILL_PROCESS)
    }

    @Test func argumentConditionsDecideAndFallThrough() {
        let filter = SeccompFilter(rules: [
            SeccompFilter.Rule("socket", conditions: [.equals(argument: 0, UInt32(AF_UNIX))])!,
            SeccompFilter.Rule("socket", conditions: [.equals(argument: 0, UInt32(AF_INET)), .equals(argument: 1, 1)])!,
            SeccompFilter.Rule("clone", conditions: [.hasBits(argument: 0, cloneThread)])!,
            SeccompFilter.Rule("clone3", action: .errno(ENOSYS))!,
            SeccompFilter.Rule("read")!,
        ], defaultAction: .killProcess)
        let program = filter.program()
        let socket = number("socket"), clone = number("clone")
        #expect(evaluate(program, number: socket, arguments: [UInt64(AF_UNIX), 1]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: socket, arguments: [UInt64(AF_INET), 1]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: socket, arguments: [UInt64(AF_INET), 2]) == SECCOMP_RET_KILL_PROCESS)
        #expect(evaluate(program, number: socket, arguments: [UInt64(AF_INET6), 1]) == SECCOMP_RET_KILL_PROCESS)
        // CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM, as pthread_create.
        let threadFlags: UInt64 = 0x100 | 0x200 | 0x400 | 0x800 | UInt64(cloneThread) | 0x40000
        #expect(evaluate(program, number: clone, arguments: [threadFlags]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: clone, arguments: [UInt64(SIGCHLD)]) == SECCOMP_RET_KILL_PROCESS, "fork's clone")
        #expect(evaluate(program, number: number("clone3")) == SECCOMP_RET_ERRNO | UInt32(ENOSYS))
        // After failed checks the number is reloaded: a later rule still sees it.
        #expect(evaluate(program, number: number("read")) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("write")) == SECCOMP_RET_KILL_PROCESS)
    }

    @Test func theVMMsFilterRefusesWhatAVMMNeverDoes() {
        let program = Confinement.filter(.vmm).program()
        for name in ["read", "write", "futex", "mmap", "openat", "recvmsg", "exit_group", "rt_sigreturn"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ALLOW, "\(name)")
        }
        for name in ["execve", "execveat", "fork", "vfork", "ptrace", "mount", "umount2", "pivot_root", "chroot", "setuid",
                     "init_module", "kexec_load", "bpf", "perf_event_open", "process_vm_writev", "personality", "unshare", "setns",
                     "keyctl", "add_key", "userfaultfd", "io_uring_setup"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_TRAP, "\(name)")
        }
        #expect(evaluate(program, number: number("socket"), arguments: [UInt64(AF_UNIX)]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("socket"), arguments: [UInt64(AF_INET)]) == SECCOMP_RET_TRAP)
        #expect(evaluate(program, number: number("clone"), arguments: [UInt64(SIGCHLD)]) == SECCOMP_RET_TRAP)
        // Helpers (passt): SIGKILL to one process, waiting for one process and reaping it; no other signal to another process.
        #expect(evaluate(program, number: number("kill"), arguments: [1234, UInt64(SIGKILL)]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("kill"), arguments: [1234, UInt64(SIGTERM)]) == SECCOMP_RET_TRAP)
        #expect(evaluate(program, number: number("waitid"), arguments: [1 /* P_PID */]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("waitid"), arguments: [0 /* P_ALL */]) == SECCOMP_RET_TRAP)
        #expect(evaluate(program, number: number("wait4")) == SECCOMP_RET_ALLOW)
        // ioctl for KVM and terminals, not TIOCSTI (typing into the user's terminal); prctl to name threads only.
        let ioctl = number("ioctl")
        for request in [SWIFTLET_KVM_RUN, SWIFTLET_KVM_IRQ_LINE, SWIFTLET_KVM_CREATE_VM, SWIFTLET_KVM_GET_TSC_KHZ, SWIFTLET_TIOCGWINSZ, UInt(TCGETS)] {
            #expect(evaluate(program, number: ioctl, arguments: [3, UInt64(request)]) == SECCOMP_RET_ALLOW, "ioctl \(request)")
        }
        #expect(evaluate(program, number: ioctl, arguments: [0, 0x5412]) == SECCOMP_RET_TRAP, "TIOCSTI")
        #expect(evaluate(program, number: number("prctl"), arguments: [15]) == SECCOMP_RET_ALLOW, "PR_SET_NAME")
        #expect(evaluate(program, number: number("prctl"), arguments: [4]) == SECCOMP_RET_TRAP, "PR_SET_DUMPABLE")
        #expect(Confinement.filter(.vmm, defaultAction: .log).program().last?.k == SECCOMP_RET_LOG)
    }

    @Test func aVCPUThreadsFilterRefusesFilesByNameAndListeningSockets() {
        let program = Confinement.vcpuFilter().program()
        for name in ["read", "pwrite64", "futex", "mmap", "madvise", "getrandom", "sendmsg", "connect", "exit", "rt_sigreturn"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ALLOW, "\(name)")
        }
        #expect(evaluate(program, number: number("ioctl"), arguments: [3, UInt64(SWIFTLET_KVM_RUN)]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("clone"), arguments: [UInt64(SIGCHLD)]) == SECCOMP_RET_TRAP)
        for name in ["mkdir", "rename", "unlink", "bind", "listen", "accept4", "execve", "ptrace"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_TRAP, "\(name)")
        }
        // Opening a file fails without ending the process (glibc's malloc reads a /proc file once).
        for name in ["openat", "open"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ERRNO | UInt32(EACCES), "\(name)")
        }
    }

    /// The one filter this suite installs, on a thread of its own that ends at once (a filter
    /// stays on its thread only): an open on a vCPU thread fails with EACCES and the process
    /// lives on. glibc's malloc opens /proc/sys/vm/overcommit_memory on whichever thread first
    /// trims its own arena, and a trap there ended a VMM whose guest wrote 100 MiB to its console.
    @Test func anOpenOnAVCPUThreadFailsWithoutEndingTheProcess() throws {
        let program = Confinement.vcpuFilter().program().map { sock_filter(code: $0.code, jt: $0.jt, jf: $0.jf, k: $0.k) }
        let outcome = Mutex<(installed: Int, fd: Int32, errno: Int32)?>(nil)
        let thread = try OSThread.start(name: "filtered") {
            _ = swiftlet_set_no_new_privileges()
            let installed = program.withUnsafeBufferPointer { swiftlet_seccomp_install($0.baseAddress, UInt16($0.count), 0) }
            let fd = open("/proc/sys/vm/overcommit_memory", O_RDONLY | O_CLOEXEC)
            let error = errno
            if fd >= 0 { close(fd) }
            outcome.withLock { $0 = (installed, fd, error) }
        }
        thread.join()
        let result = try #require(outcome.withLock { $0 })
        #expect(result.installed == 0)
        #expect(result.fd == -1)
        #expect(result.errno == EACCES)
    }

    @Test func aDeviceThreadsFilterRefusesKVMButTheInterruptThreadsAndFilesByName() {
        let program = Confinement.deviceFilter().program()
        for name in ["read", "write", "epoll_wait", "futex", "mmap", "socketpair", "connect", "sendmsg", "exit"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ALLOW, "\(name)")
        }
        let ioctl = number("ioctl")
        #expect(evaluate(program, number: ioctl, arguments: [3, UInt64(SWIFTLET_KVM_IRQ_LINE)]) == SECCOMP_RET_ALLOW)
        for request in [SWIFTLET_KVM_RUN, SWIFTLET_KVM_SET_USER_MEMORY_REGION, SWIFTLET_KVM_CREATE_VCPU, SWIFTLET_KVM_SET_REGS] {
            #expect(evaluate(program, number: ioctl, arguments: [3, UInt64(request)]) == SECCOMP_RET_TRAP, "ioctl \(request)")
        }
        #expect(evaluate(program, number: number("socket"), arguments: [UInt64(AF_UNIX)]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("socket"), arguments: [UInt64(AF_INET)]) == SECCOMP_RET_TRAP)
        for name in ["clone", "seccomp", "bind", "listen", "accept4", "execve", "kill"] {
            #expect(evaluate(program, number: number(name), arguments: [0x0001_0000]) == SECCOMP_RET_TRAP, "\(name)")
        }
        #expect(evaluate(program, number: number("openat")) == SECCOMP_RET_ERRNO | UInt32(EACCES))
        // A vCPU thread may add it (the device's loop may start there).
        #expect(evaluate(Confinement.vcpuFilter().program(), number: number("seccomp"), arguments: [1]) == SECCOMP_RET_ALLOW)
    }

    @Test func aFileServerThreadsFilterAllowsFilesBeneathHeldDirectoriesAndNoKVMSocketsOrProcesses() {
        let program = Confinement.fileServerFilter().program()
        let vmm = Confinement.filter(.vmm).program()
        for name in ["openat2", "openat", "newfstatat", "getdents64", "readlinkat", "mkdirat", "symlinkat", "unlinkat", "renameat2",
                     "linkat", "fchmodat", "fchownat", "utimensat", "getxattr", "setxattr", "listxattr", "removexattr", "pread64",
                     "pwrite64", "fsync", "fallocate", "ftruncate", "fstatfs", "lseek", "close", "futex", "poll", "read", "write"] {
            #expect(evaluate(program, number: number(name)) == SECCOMP_RET_ALLOW, "\(name)")
            #expect(evaluate(vmm, number: number(name)) == SECCOMP_RET_ALLOW, "the process's filter lets \(name) through too")
        }
        #expect(evaluate(program, number: number("ioctl"), arguments: [3, UInt64(SWIFTLET_KVM_IRQ_LINE)]) == SECCOMP_RET_ALLOW)
        #expect(evaluate(program, number: number("ioctl"), arguments: [3, UInt64(SWIFTLET_KVM_RUN)]) == SECCOMP_RET_TRAP)
        for name in ["socket", "connect", "bind", "clone", "execve", "kill", "ptrace", "mount", "chroot", "open_by_handle_at", "seccomp"] {
            #expect(evaluate(program, number: number(name), arguments: [0x0001_0000]) == SECCOMP_RET_TRAP, "\(name)")
        }
    }

    @Test func theModeComesFromTheEnvironmentAndABadValueIsAnError() throws {
        #expect(try Confinement.mode(nil) == .on)
        #expect(try Confinement.mode("") == .on)
        #expect(try Confinement.mode("off") == .off)
        #expect(try Confinement.mode("log") == .log)
        #expect(throws: SwiftletError.self) { try Confinement.mode("no") }
    }
}
