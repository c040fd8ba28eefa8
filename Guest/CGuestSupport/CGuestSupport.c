#define _GNU_SOURCE
#include "CGuestSupport.h"
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <termios.h>
#include <unistd.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/random.h>
#include <errno.h>

int guest_signalfd(int signo) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, signo);
    return signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
}

int guest_read_signal(int fd) {
    struct signalfd_siginfo info;
    return read(fd, &info, sizeof info) == sizeof info ? (int)info.ssi_signo : -1;
}

int guest_open_pty(int *controller, int *terminal, unsigned short rows, unsigned short columns) {
    int c = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (c < 0) return -1;
    char name[128];
    if (grantpt(c) != 0 || unlockpt(c) != 0 || ptsname_r(c, name, sizeof name) != 0) { close(c); return -1; }
    int t = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (t < 0) { close(c); return -1; }
    guest_set_window_size(t, rows, columns);
    *controller = c;
    *terminal = t;
    return 0;
}

int guest_set_window_size(int fd, unsigned short rows, unsigned short columns) {
    struct winsize size = { .ws_row = rows, .ws_col = columns };
    return ioctl(fd, TIOCSWINSZ, &size);
}

// The local ports the agent connects from: Linux's vsock lets only a process with
// CAP_NET_BIND_SERVICE bind a port at or below 1023 (LAST_RESERVED_PORT in net/vmw_vsock/af_vsock.c)
// and gives unbound sockets ports above it, so the host knows a connection from one of these is
// not an ordinary guest process's.
enum { AGENT_PORT_LOWEST = 512, AGENT_PORT_HIGHEST = 1023 };

int guest_vsock_connect(unsigned int cid, unsigned int port) {
    // Where the search starts moves on with every attempt: a port whose old connection the host
    // has not let go of yet is passed over when the caller tries again.
    static unsigned int next = AGENT_PORT_HIGHEST;
    for (int tries = 0; tries <= AGENT_PORT_HIGHEST - AGENT_PORT_LOWEST; tries++) {
        unsigned int local = next;
        next = next <= AGENT_PORT_LOWEST ? AGENT_PORT_HIGHEST : next - 1;
        int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) return -1;
        struct sockaddr_vm source = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = local };
        if (bind(s, (struct sockaddr *)&source, sizeof source) != 0) {
            int saved = errno;
            close(s);
            if (saved == EADDRINUSE) continue; // another session's, or a listener's
            errno = saved;
            return -1;
        }
        struct sockaddr_vm address = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
        if (connect(s, (struct sockaddr *)&address, sizeof address) != 0) { close(s); return -1; }
        return s;
    }
    errno = EADDRINUSE;
    return -1;
}

int guest_unix_connect(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof address.sun_path) { close(s); return -1; }
    strcpy(address.sun_path, path);
    if (connect(s, (struct sockaddr *)&address, sizeof address) != 0) { close(s); return -1; }
    return s;
}

int guest_block_signal(int signo) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, signo);
    return sigprocmask(SIG_BLOCK, &mask, NULL);
}

int guest_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

// Makes `fd` the child's descriptor `target`, open across exec. dup2 onto itself would keep the
// close-on-exec flag, so that case clears it instead.
static int spawn_place(int fd, int target) {
    if (fd == target) return fcntl(fd, F_SETFD, 0);
    return dup2(fd, target) < 0 ? -1 : 0;
}

// The child of guest_spawn. It shares the parent's memory (the parent waits, suspended), so it
// only makes system calls and writes its result into the request.
static int spawn_child(void *argument) {
    struct guest_spawn_request *r = argument;
    // The parent's handlers are the parent's code: the program starts with default dispositions,
    // and only then with an empty mask (guest_spawn blocked every signal around the clone). The
    // system call, not sigaction(3): glibc refuses the real-time signals it keeps for itself,
    // which a parent may still have ignored.
    struct { void (*handler)(int); unsigned long flags; void (*restorer)(void); unsigned long mask; } action = { SIG_DFL, 0, NULL, 0 };
    for (int s = 1; s < NSIG; s++) {
        if (s != SIGKILL && s != SIGSTOP) syscall(SYS_rt_sigaction, s, &action, NULL, sizeof action.mask);
    }
    setsid();
    int placed = 0;
    if (r->terminal) placed = ioctl(r->input, TIOCSCTTY, 0);
    if (placed == 0) placed = spawn_place(r->input, 0);
    if (placed == 0) placed = spawn_place(r->output, 1);
    if (placed == 0) placed = spawn_place(r->error, 2);
    if (placed != 0) { r->failed_errno = errno; r->failed_step = GUEST_SPAWN_EXEC; _exit(127); }
    // Only the three streams go on: not the agent's connection, nor anything it inherited.
    close_range(3, ~0U, 0);
    if (chdir(r->directory) != 0) { r->failed_errno = errno; r->failed_step = GUEST_SPAWN_DIRECTORY; _exit(127); }
    if (r->change_identity && (setgroups(1, &r->gid) != 0 || setgid(r->gid) != 0 || setuid(r->uid) != 0)) {
        r->failed_errno = errno; r->failed_step = GUEST_SPAWN_IDENTITY; _exit(127);
    }
    sigset_t empty;
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
    execve(r->path, r->arguments, r->environment);
    r->failed_errno = errno;
    r->failed_step = GUEST_SPAWN_EXEC;
    _exit(127);
}

// The child's stack while it runs before exec: the parent is suspended meanwhile, so one serves
// every spawn of a single-threaded caller (the agent), and its pages stay warm.
static char spawn_stack[64 << 10] __attribute__((aligned(16)));

pid_t guest_spawn(struct guest_spawn_request *request) {
    request->failed_errno = 0;
    request->failed_step = 0;
    // No signal handler may run in the child while it shares the parent's memory and handlers.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid_t pid = clone(spawn_child, spawn_stack + sizeof spawn_stack, CLONE_VM | CLONE_VFORK | SIGCHLD, request);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = saved;
    return pid;
}

int guest_power_off(void) { return reboot(RB_POWER_OFF); }

// Mixes `length` bytes of host randomness into the kernel's pool, credited as entropy, and makes
// the kernel reseed its generator from the pool at once (RNDADDENTROPY, RNDRESEEDCRNG). Used when
// the machine is a restored copy whose generator state other copies share. Returns 0 or -errno.
int guest_reseed_random(const unsigned char *bytes, int length) {
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct rand_pool_info *info = malloc(sizeof(struct rand_pool_info) + (size_t)length);
    if (info == NULL) { close(fd); return -ENOMEM; }
    info->entropy_count = length * 8;
    info->buf_size = length;
    memcpy(info->buf, bytes, (size_t)length);
    int result = 0;
    if (ioctl(fd, RNDADDENTROPY, info) != 0 || ioctl(fd, RNDRESEEDCRNG) != 0) result = -errno;
    free(info);
    close(fd);
    return result;
}

long guest_filesystem_type(const char *path) {
    struct statfs info;
    if (statfs(path, &info) != 0) return -errno;
    return (long)info.f_type;
}

// Fills `request` with the interface name; -EINVAL unless it is a valid name.
static int interface_request(const char *name, struct ifreq *request) {
    if (name == NULL) return -EINVAL;
    size_t length = strnlen(name, IFNAMSIZ);
    if (length == 0 || length >= IFNAMSIZ || strchr(name, '/') != NULL) return -EINVAL;
    memset(request, 0, sizeof *request);
    memcpy(request->ifr_name, name, length);
    return 0;
}

// One ioctl on a fresh AF_INET datagram socket; 0 or -errno.
static int inet_ioctl(unsigned long request, void *argument) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int result = ioctl(fd, request, argument) == 0 ? 0 : -errno;
    close(fd);
    return result;
}

static void set_inet_address(struct sockaddr *target, uint32_t address) {
    struct sockaddr_in in;
    memset(&in, 0, sizeof in);
    in.sin_family = AF_INET;
    in.sin_addr.s_addr = htonl(address);
    memcpy(target, &in, sizeof in);
}

int guest_net_set_mtu(const char *name, unsigned int mtu) {
    struct ifreq request;
    int e = interface_request(name, &request);
    if (e != 0) return e;
    if (mtu < 68 || mtu > 65535) return -EINVAL;
    request.ifr_mtu = (int)mtu;
    return inet_ioctl(SIOCSIFMTU, &request);
}

int guest_net_set_ipv4(const char *name, uint32_t address, unsigned int prefix_length) {
    struct ifreq request;
    int e = interface_request(name, &request);
    if (e != 0) return e;
    if (prefix_length < 1 || prefix_length > 32 || address == 0) return -EINVAL;
    set_inet_address(&request.ifr_addr, address);
    if ((e = inet_ioctl(SIOCSIFADDR, &request)) != 0) return e;
    interface_request(name, &request);
    set_inet_address(&request.ifr_netmask, prefix_length == 32 ? 0xFFFFFFFFu : ~(0xFFFFFFFFu >> prefix_length));
    return inet_ioctl(SIOCSIFNETMASK, &request);
}

int guest_net_up(const char *name) {
    struct ifreq request;
    int e = interface_request(name, &request);
    if (e != 0) return e;
    if ((e = inet_ioctl(SIOCGIFFLAGS, &request)) != 0) return e;
    if (request.ifr_flags & IFF_UP) return 0;
    request.ifr_flags |= IFF_UP;
    return inet_ioctl(SIOCSIFFLAGS, &request);
}

int guest_net_add_default_route(const char *name, uint32_t gateway) {
    struct ifreq check;
    int e = interface_request(name, &check);
    if (e != 0) return e;
    if (gateway == 0) return -EINVAL;
    char device[IFNAMSIZ];
    memcpy(device, check.ifr_name, IFNAMSIZ);
    struct rtentry route;
    memset(&route, 0, sizeof route);
    set_inet_address(&route.rt_dst, 0);
    set_inet_address(&route.rt_genmask, 0);
    set_inet_address(&route.rt_gateway, gateway);
    route.rt_flags = RTF_UP | RTF_GATEWAY;
    route.rt_dev = device;
    e = inet_ioctl(SIOCADDRT, &route);
    return e == -EEXIST ? 0 : e;
}

int guest_net_announce(const char *name, const unsigned char *mac, uint32_t address) {
    struct ifreq request;
    int e = interface_request(name, &request);
    if (e != 0) return e;
    if (mac == NULL || address == 0) return -EINVAL;
    if ((e = inet_ioctl(SIOCGIFINDEX, &request)) != 0) return e;
    // Ethernet header (14 bytes), then the ARP request (28 bytes): 42 bytes.
    unsigned char frame[42];
    memset(frame, 0xFF, 6);                     // destination: broadcast
    memcpy(frame + 6, mac, 6);                  // source: the guest
    frame[12] = ETH_P_ARP >> 8; frame[13] = ETH_P_ARP & 0xFF;
    unsigned char *arp = frame + 14;
    arp[0] = 0; arp[1] = ARPHRD_ETHER;          // hardware type: Ethernet
    arp[2] = ETH_P_IP >> 8; arp[3] = ETH_P_IP & 0xFF;
    arp[4] = 6; arp[5] = 4;                     // address lengths
    arp[6] = 0; arp[7] = ARPOP_REQUEST;
    uint32_t network_address = htonl(address);
    memcpy(arp + 8, mac, 6);                    // sender hardware address
    memcpy(arp + 14, &network_address, 4);      // sender protocol address
    memset(arp + 18, 0, 6);                     // target hardware address: unknown
    memcpy(arp + 24, &network_address, 4);      // target protocol address: the same (gratuitous)
    // One packet socket for the agent's life, with no protocol: it receives nothing, and it is
    // never closed, because closing a packet socket waits for an RCU grace period (tens of
    // milliseconds in a busy or emulated guest), which every restored run would pay.
    static int fd = -1;
    if (fd < 0) {
        fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
        if (fd < 0) return -errno;
    }
    struct sockaddr_ll link;
    memset(&link, 0, sizeof link);
    link.sll_family = AF_PACKET;
    link.sll_protocol = htons(ETH_P_ARP);
    link.sll_ifindex = request.ifr_ifindex;
    link.sll_halen = 6;
    memset(link.sll_addr, 0xFF, 6);
    ssize_t sent = sendto(fd, frame, sizeof frame, 0, (struct sockaddr *)&link, sizeof link);
    return sent == (ssize_t)sizeof frame ? 0 : (sent < 0 ? -errno : -EIO);
}
