// System calls and constants swiftlet-init needs that Swift's Glibc module does not export.
#pragma once
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

/// A signalfd(2) for `signo` (the signal must be blocked); -1 on error.
int guest_signalfd(int signo);
/// Reads one siginfo from a signalfd; returns the signal number or -1.
int guest_read_signal(int fd);
/// Opens a pseudo-terminal pair; fills the controller and the terminal's descriptors. 0 on success.
int guest_open_pty(int *controller, int *terminal, unsigned short rows, unsigned short columns);
/// Sets a terminal's window size.
int guest_set_window_size(int fd, unsigned short rows, unsigned short columns);
/// Connects a stream socket to vsock `cid`:`port` from a privileged local port (at most 1023,
/// which only a process with CAP_NET_BIND_SERVICE may bind); returns the descriptor or -1.
int guest_vsock_connect(unsigned int cid, unsigned int port);
/// Connects a stream socket to a Unix socket path (for running the agent as an ordinary process).
int guest_unix_connect(const char *path);
/// Blocks every signal in the calling thread except those in none; returns 0 on success.
int guest_block_signal(int signo);
/// A program to start in a session of its own (`guest_spawn`).
struct guest_spawn_request {
    const char *path;
    char *const *arguments;   // NULL-terminated
    char *const *environment; // NULL-terminated
    const char *directory;
    /// Become its standard input, output and error.
    int input, output, error;
    /// Nonzero: `input` is a terminal that becomes the controlling terminal.
    int terminal;
    /// Nonzero: run as `uid`:`gid` with `gid` as the only supplementary group.
    int change_identity;
    uid_t uid;
    gid_t gid;
    /// Out: 0 when the program runs; else the errno of the step that failed, and which.
    int failed_errno;
    int failed_step;
};

enum { GUEST_SPAWN_DIRECTORY = 1, GUEST_SPAWN_IDENTITY = 2, GUEST_SPAWN_EXEC = 3 };

/// Starts `request->path` in a new session without copying the caller's address space (clone
/// with CLONE_VM | CLONE_VFORK, as posix_spawn does; the caller is suspended until the child has
/// exec'd or failed). Returns the child's pid; when a step failed, `failed_errno` and
/// `failed_step` say which and the child has exited with status 127 (reap it). -1 and errno when
/// no process could be made. Not for concurrent use by several threads (one child stack).
pid_t guest_spawn(struct guest_spawn_request *request);

/// pipe2(2) with O_CLOEXEC; 0 on success.
int guest_pipe(int fds[2]);
/// Powers the machine off (reboot(2) with RB_POWER_OFF).
int guest_power_off(void);

// Mixes host randomness into the kernel pool and reseeds its generator; 0 or -errno.
int guest_reseed_random(const unsigned char *bytes, int length);

// The filesystem type (statfs f_type) of the file system holding `path`; -errno on failure.
long guest_filesystem_type(const char *path);

// Network interface set-up with ioctls on an AF_INET socket (no `ip` binary in the guest).
// `name` is an interface name (shorter than IFNAMSIZ); addresses are IPv4 in host byte order.
// Each returns 0 or -errno (-EINVAL for arguments out of range, before any system call).

/// Sets the interface's MTU (68 to 65535).
int guest_net_set_mtu(const char *name, unsigned int mtu);
/// Gives the interface `address`/`prefix_length` (1 to 32) as its IPv4 address; the same address again is no change.
int guest_net_set_ipv4(const char *name, uint32_t address, unsigned int prefix_length);
/// Brings the interface up (IFF_UP).
int guest_net_up(const char *name);
/// Adds the IPv4 default route via `gateway` on the interface; a route that is already there is success.
int guest_net_add_default_route(const char *name, uint32_t gateway);
/// Announces the interface's `address` with one gratuitous ARP request (broadcast, sender and
/// target address both `address`, sender hardware address `mac`, 6 bytes), over an AF_PACKET
/// socket. The network learns where the guest is without waiting for it to speak: passt, which
/// otherwise sends to the broadcast address until it has seen a frame from the guest (a TCP
/// segment the guest then drops), and anything that cached another MAC before a restore.
int guest_net_announce(const char *name, const unsigned char *mac, uint32_t address);
