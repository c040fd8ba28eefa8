#define _GNU_SOURCE
#include "CGuestSupport.h"
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <termios.h>
#include <unistd.h>
#include <linux/vm_sockets.h>
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

int guest_set_controlling_terminal(int fd) { return ioctl(fd, TIOCSCTTY, 0); }

int guest_vsock_connect(unsigned int cid, unsigned int port) {
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_vm address = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    if (connect(s, (struct sockaddr *)&address, sizeof address) != 0) { close(s); return -1; }
    return s;
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

void guest_reset_signals(void) {
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    sigset_t empty;
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
}

int guest_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

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
