// The agent initramfs's /init: mounts /proc, which the Swift runtime reads before any Swift code
// runs (a static Swift executable aborts with "Unable to obtain Swift runtime path" without it),
// then becomes /swiftlet-init. Freestanding, like guest/initramfs/marker.c.

static long sys(long n, long a, long b, long c, long d, long e) {
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8) : "rcx", "r11", "memory");
    return r;
}
enum { SYS_write = 1, SYS_execve = 59, SYS_exit = 60, SYS_mount = 165 };

__attribute__((noreturn, used)) void start_c(long *stack) {
    long argc = stack[0];
    char **argv = (char **)(stack + 1), **envp = argv + argc + 1;
    sys(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0);
    argv[0] = "/swiftlet-init";
    sys(SYS_execve, (long)"/swiftlet-init", (long)argv, (long)envp, 0, 0);
    static const char message[] = "init: cannot run /swiftlet-init\n";
    sys(SYS_write, 2, (long)message, sizeof message - 1, 0, 0);
    sys(SYS_exit, 1, 0, 0, 0, 0);
    __builtin_unreachable();
}
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n");
