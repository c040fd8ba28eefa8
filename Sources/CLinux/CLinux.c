#define _GNU_SOURCE
#include "CLinux.h"
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <cpuid.h>
#include <sys/random.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <linux/openat2.h>
#include <sys/signalfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netdb.h>
#include <stdio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <errno.h>

const unsigned long SWIFTLET_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long SWIFTLET_KVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long SWIFTLET_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long SWIFTLET_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long SWIFTLET_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long SWIFTLET_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
const unsigned long SWIFTLET_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long SWIFTLET_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long SWIFTLET_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long SWIFTLET_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long SWIFTLET_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long SWIFTLET_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long SWIFTLET_KVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long SWIFTLET_KVM_IRQFD = KVM_IRQFD;
const unsigned long SWIFTLET_KVM_IOEVENTFD = KVM_IOEVENTFD;
const unsigned long SWIFTLET_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
const unsigned long SWIFTLET_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
const unsigned long SWIFTLET_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
const unsigned long SWIFTLET_KVM_GET_PIT2 = KVM_GET_PIT2;
const unsigned long SWIFTLET_KVM_SET_PIT2 = KVM_SET_PIT2;
const unsigned long SWIFTLET_KVM_GET_CLOCK = KVM_GET_CLOCK;
const unsigned long SWIFTLET_KVM_SET_CLOCK = KVM_SET_CLOCK;
const unsigned long SWIFTLET_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
const unsigned long SWIFTLET_KVM_RUN = KVM_RUN;
const unsigned long SWIFTLET_KVM_GET_REGS = KVM_GET_REGS;
const unsigned long SWIFTLET_KVM_SET_REGS = KVM_SET_REGS;
const unsigned long SWIFTLET_KVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long SWIFTLET_KVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long SWIFTLET_KVM_GET_FPU = KVM_GET_FPU;
const unsigned long SWIFTLET_KVM_SET_FPU = KVM_SET_FPU;
const unsigned long SWIFTLET_KVM_GET_MSRS = KVM_GET_MSRS;
const unsigned long SWIFTLET_KVM_SET_MSRS = KVM_SET_MSRS;
const unsigned long SWIFTLET_KVM_SET_CPUID2 = KVM_SET_CPUID2;
const unsigned long SWIFTLET_KVM_GET_CPUID2 = KVM_GET_CPUID2;
const unsigned long SWIFTLET_KVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long SWIFTLET_KVM_SET_LAPIC = KVM_SET_LAPIC;
const unsigned long SWIFTLET_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
const unsigned long SWIFTLET_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
const unsigned long SWIFTLET_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
const unsigned long SWIFTLET_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
const unsigned long SWIFTLET_KVM_GET_XSAVE = KVM_GET_XSAVE;
const unsigned long SWIFTLET_KVM_SET_XSAVE = KVM_SET_XSAVE;
const unsigned long SWIFTLET_KVM_GET_XCRS = KVM_GET_XCRS;
const unsigned long SWIFTLET_KVM_SET_XCRS = KVM_SET_XCRS;
const unsigned long SWIFTLET_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
const unsigned long SWIFTLET_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
const unsigned long SWIFTLET_KVM_TRANSLATE = KVM_TRANSLATE;
const unsigned long SWIFTLET_KVM_KVMCLOCK_CTRL = KVM_KVMCLOCK_CTRL;
const unsigned long SWIFTLET_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
const unsigned long SWIFTLET_KVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
const unsigned long SWIFTLET_TIOCGWINSZ = TIOCGWINSZ;

int swiftlet_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int swiftlet_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
int swiftlet_open(const char *path, int flags, unsigned int mode) { return open(path, flags | O_CLOEXEC, mode); }
int swiftlet_mkostemp(char *template_path, int flags) { return mkostemp(template_path, flags); }
long swiftlet_getrandom(void *buffer, unsigned long length, unsigned int flags) { return getrandom(buffer, length, flags); }
void swiftlet_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) {
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
}

int swiftlet_host_has_avx2(void) {
    unsigned int a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    // AVX and OSXSAVE: the CPU has AVX and the kernel saves its registers (XCR0 has SSE and YMM).
    if ((c & (1u << 28)) == 0 || (c & (1u << 27)) == 0) return 0;
    unsigned int xcr0_low, xcr0_high;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & 0x6) != 0x6) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) != 0;
}
int swiftlet_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}
int swiftlet_sigrtmin(void) { return SIGRTMIN; }
int swiftlet_signalfd(const int *signals, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, signals[i]);
    int error = pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (error != 0) { errno = error; return -1; } // pthread_sigmask returns its error, not -1
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}
int swiftlet_read_signal(int fd) {
    struct signalfd_siginfo info;
    return read(fd, &info, sizeof info) == sizeof info ? (int)info.ssi_signo : -1;
}
void swiftlet_set_thread_name(const char *name) { pthread_setname_np(pthread_self(), name); }
int swiftlet_gettid(void) { return (int)syscall(SYS_gettid); }

static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t process_start_ns;

// Runs before Swift's main: the earliest point at which the process's own code observes the clock.
__attribute__((constructor(101))) static void swiftlet_record_process_start(void) {
    process_start_ns = monotonic_ns();
}

uint64_t swiftlet_process_start_ns(void) { return process_start_ns; }
uint64_t swiftlet_monotonic_ns(void) { return monotonic_ns(); }

static void swiftlet_wakeup_handler(int signo) { (void)signo; }

int swiftlet_install_wakeup_signal(int signo) {
    struct sigaction action = {0};
    action.sa_handler = swiftlet_wakeup_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signo, &action, NULL);
}

static int unix_address(const char *path, struct sockaddr_un *address) {
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof address->sun_path) { errno = ENAMETOOLONG; return -1; }
    strcpy(address->sun_path, path);
    return 0;
}

int swiftlet_unix_listen(const char *path, int backlog) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    /* The socket file bind makes takes this mode (less the umask): only its owner may connect. */
    if (fchmod(fd, 0600) != 0 || bind(fd, (struct sockaddr *)&address, sizeof address) != 0 || listen(fd, backlog) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int swiftlet_unix_connect(const char *path) {
    struct sockaddr_un address;
    if (unix_address(path, &address) != 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int r;
    do { r = connect(fd, (struct sockaddr *)&address, sizeof address); } while (r != 0 && errno == EINTR);
    if (r != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

// TCP: numeric or named hosts through getaddrinfo. A getaddrinfo failure returns -2 with
// *resolve_error set to its code (gai_strerror explains it); a socket failure returns -1 with errno.
static int tcp_resolve(const char *host, unsigned short port, int flags, struct addrinfo **found, int *resolve_error) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = flags | AI_NUMERICSERV;
    char service[8];
    snprintf(service, sizeof service, "%u", (unsigned)port);
    int e = getaddrinfo(host, service, &hints, found);
    if (e != 0) { *resolve_error = e; return -2; }
    return 0;
}

int swiftlet_tcp_listen(const char *host, unsigned short port, int backlog, int *resolve_error) {
    struct addrinfo *found = NULL;
    if (tcp_resolve(host, port, AI_PASSIVE, &found, resolve_error) != 0) return -2;
    int fd = -1, saved = EADDRNOTAVAIL;
    for (struct addrinfo *a = found; a != NULL; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) { saved = errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, backlog) == 0) break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0) errno = saved;
    return fd;
}

int swiftlet_tcp_connect(const char *host, unsigned short port, int timeout_ms, int *resolve_error) {
    struct addrinfo *found = NULL;
    if (tcp_resolve(host, port, 0, &found, resolve_error) != 0) return -2;
    int fd = -1, saved = ECONNREFUSED;
    for (struct addrinfo *a = found; a != NULL; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) { saved = errno; continue; }
        int r = connect(fd, a->ai_addr, a->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            int ready;
            do { ready = poll(&p, 1, timeout_ms); } while (ready < 0 && errno == EINTR);
            if (ready == 0) { errno = ETIMEDOUT; r = -1; }
            else if (ready > 0) {
                int error = 0; socklen_t length = sizeof error;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
                if (error != 0) { errno = error; r = -1; } else r = 0;
            } else r = -1;
        }
        if (r == 0) {
            int flags = fcntl(fd, F_GETFL);
            fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            break;
        }
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0) errno = saved;
    return fd;
}

int swiftlet_tcp_port(int fd) {
    struct sockaddr_storage address;
    socklen_t length = sizeof address;
    if (getsockname(fd, (struct sockaddr *)&address, &length) != 0) return -1;
    if (address.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&address)->sin_port);
    if (address.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&address)->sin6_port);
    errno = EAFNOSUPPORT;
    return -1;
}

void swiftlet_tcp_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

const char *swiftlet_resolve_error(int code) { return gai_strerror(code); }

#define SWIFTLET_MAX_PASSED_FDS 8

long swiftlet_send_with_fds(int socket, const void *bytes, unsigned long length, const int *fds, int count) {
    if (count < 0 || count > SWIFTLET_MAX_PASSED_FDS || length == 0) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)bytes, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(int) * SWIFTLET_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (count > 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * (size_t)count);
    }
    long n;
    do { n = sendmsg(socket, &message, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n;
}

long swiftlet_receive_with_fds(int socket, void *bytes, unsigned long length, int *fds, int capacity, int *count) {
    *count = 0;
    struct iovec iov = { .iov_base = bytes, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(int) * SWIFTLET_MAX_PASSED_FDS)]; struct cmsghdr align; } control;
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer };
    long n;
    do { n = recvmsg(socket, &message, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    int overflow = (message.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        int received = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < received; i++) {
            int passed;
            memcpy(&passed, CMSG_DATA(header) + sizeof(int) * (size_t)i, sizeof passed);
            if (*count < capacity) fds[(*count)++] = passed;
            else { close(passed); overflow = 1; }
        }
    }
    if (overflow) {
        // More descriptors came than there was room for: none is kept, and the call fails.
        for (int i = 0; i < *count; i++) close(fds[i]);
        *count = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return n;
}

int swiftlet_accept(int listener) {
    int fd;
    do { fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC); } while (fd < 0 && errno == EINTR);
    return fd;
}

int swiftlet_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int swiftlet_swap_descriptor_limit(int pid, unsigned long long *soft, unsigned long long *hard) {
    struct rlimit wanted = { .rlim_cur = *soft, .rlim_max = *hard }, old;
    if (prlimit(pid, RLIMIT_NOFILE, &wanted, &old) != 0) return -1;
    *soft = old.rlim_cur;
    *hard = old.rlim_max;
    return 0;
}

int swiftlet_uffd_open(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
#ifdef USERFAULTFD_IOC_NEW
        int saved = errno;
        int device = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (device < 0) { errno = saved; return -1; }
        fd = ioctl(device, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        saved = errno;
        close(device);
        errno = saved;
#endif
        if (fd < 0) return -1;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int swiftlet_uffd_register(int fd, uint64_t start, uint64_t length) {
    struct uffdio_register reg = { .range = { .start = start, .len = length }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) return -1;
    uint64_t needed = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) | (1ULL << _UFFDIO_WAKE);
    if ((reg.ioctls & needed) != needed) {
        struct uffdio_range range = { .start = start, .len = length };
        ioctl(fd, UFFDIO_UNREGISTER, &range);
        errno = ENOTSUP;
        return -1;
    }
    return 0;
}

int swiftlet_uffd_read_fault(int fd, uint64_t *address) {
    struct uffd_msg message;
    ssize_t n;
    do { n = read(fd, &message, sizeof message); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    if (n != sizeof message) { errno = EIO; return -1; }
    if (message.event != UFFD_EVENT_PAGEFAULT) return 0;
    *address = message.arg.pagefault.address;
    return 1;
}

int swiftlet_uffd_copy(int fd, uint64_t destination, const void *source, uint64_t length) {
    struct uffdio_copy copy = { .dst = destination, .src = (uint64_t)(uintptr_t)source, .len = length, .mode = 0 };
    int result;
    do { result = ioctl(fd, UFFDIO_COPY, &copy); } while (result != 0 && errno == EINTR);
    return result;
}

int swiftlet_uffd_zero(int fd, uint64_t destination, uint64_t length) {
    struct uffdio_zeropage zero = { .range = { .start = destination, .len = length }, .mode = 0 };
    int result;
    do { result = ioctl(fd, UFFDIO_ZEROPAGE, &zero); } while (result != 0 && errno == EINTR);
    return result;
}

int swiftlet_uffd_wake(int fd, uint64_t start, uint64_t length) {
    struct uffdio_range range = { .start = start, .len = length };
    return ioctl(fd, UFFDIO_WAKE, &range);
}

int swiftlet_openat2(int directory, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve) {
    struct open_how how = { .flags = flags, .mode = mode, .resolve = resolve };
    int result;
    do { result = (int)syscall(SYS_openat2, directory, path, &how, sizeof how); } while (result < 0 && errno == EINTR);
    return result;
}

long swiftlet_getdents64(int fd, void *buffer, unsigned long length) {
    return syscall(SYS_getdents64, fd, buffer, length);
}

int swiftlet_renameat2(int from_directory, const char *from, int to_directory, const char *to, unsigned int flags) {
    return (int)syscall(SYS_renameat2, from_directory, from, to_directory, to, flags);
}

int swiftlet_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, mode, (off_t)offset, (off_t)length);
}
