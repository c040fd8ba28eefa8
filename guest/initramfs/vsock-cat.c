// vsock-cat: connects to a vsock port (on the host, CID 2, unless a CID is given), copies standard
// input to the connection and the connection to standard output, and exits when the peer closes.
// The demo guest's way to exercise Swiftlet's virtio-vsock device: echo hi | vsock-cat 1024
// Freestanding, like marker.c: raw system calls, no libc, so the initramfs stays small.

typedef unsigned long size_t;
static long sys(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
enum { SYS_read = 0, SYS_write = 1, SYS_poll = 7, SYS_socket = 41, SYS_connect = 42, SYS_shutdown = 48, SYS_exit = 60 };
enum { AF_VSOCK = 40, SOCK_STREAM = 1, SHUT_WR = 1, POLLIN = 1, EINTR = 4 };
struct sockaddr_vm { unsigned short family, reserved; unsigned int port, cid; unsigned char zero[4]; };
struct pollfd { int fd; short events, revents; };

static void say(const char *s) { size_t n = 0; while (s[n]) n++; sys(SYS_write, 2, (long)s, (long)n); }
static __attribute__((noreturn)) void quit(int status) { sys(SYS_exit, status, 0, 0); __builtin_unreachable(); }
static unsigned int number(const char *s) { unsigned int v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (unsigned)(*s++ - '0'); return v; }

/* Copies one read's worth; returns 1, 0 at end of file, -1 on error. */
static int copy(int from, int to) {
    static char buffer[65536];
    long n;
    do n = sys(SYS_read, from, (long)buffer, sizeof buffer); while (n == -EINTR);
    if (n <= 0) return n == 0 ? 0 : -1;
    for (long done = 0; done < n;) {
        long w = sys(SYS_write, to, (long)(buffer + done), n - done);
        if (w == -EINTR) continue;
        if (w < 0) return -1;
        done += w;
    }
    return 1;
}

static int run(int argc, char **argv) {
    if (argc < 2) { say("usage: vsock-cat PORT [CID]\n"); return 2; }
    struct sockaddr_vm address = { AF_VSOCK, 0, number(argv[1]), argc > 2 ? number(argv[2]) : 2, {0} };
    long s = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || sys(SYS_connect, s, (long)&address, sizeof address) < 0) { say("vsock-cat: cannot connect\n"); return 1; }
    struct pollfd fds[2] = { { 0, POLLIN, 0 }, { (int)s, POLLIN, 0 } };
    for (;;) {
        long r = sys(SYS_poll, (long)fds, 2, -1);
        if (r == -EINTR) continue;
        if (r < 0) { say("vsock-cat: poll failed\n"); return 1; }
        if (fds[0].revents && copy(0, (int)s) <= 0) { sys(SYS_shutdown, s, SHUT_WR, 0); fds[0].fd = -1; }
        if (fds[1].revents) {
            int c = copy((int)s, 1);
            if (c < 0) { say("vsock-cat: read failed\n"); return 1; }
            if (c == 0) return 0;
        }
    }
}

/* The kernel enters with argc at the stack pointer and argv after it. */
__attribute__((noreturn, used)) void start_c(long *stack) { quit(run((int)stack[0], (char **)(stack + 1))); }
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n");
