// System calls and constants swiftlet-init needs that Swift's Glibc module does not export.
#pragma once
#include <signal.h>
#include <stdint.h>

/// A signalfd(2) for `signo` (the signal must be blocked); -1 on error.
int guest_signalfd(int signo);
/// Reads one siginfo from a signalfd; returns the signal number or -1.
int guest_read_signal(int fd);
/// Opens a pseudo-terminal pair; fills the controller and the terminal's descriptors. 0 on success.
int guest_open_pty(int *controller, int *terminal, unsigned short rows, unsigned short columns);
/// Sets a terminal's window size.
int guest_set_window_size(int fd, unsigned short rows, unsigned short columns);
/// Makes `fd` the calling process's controlling terminal (after setsid).
int guest_set_controlling_terminal(int fd);
/// Connects a stream socket to vsock `cid`:`port`; returns the descriptor or -1.
int guest_vsock_connect(unsigned int cid, unsigned int port);
/// Connects a stream socket to a Unix socket path (for running the agent as an ordinary process).
int guest_unix_connect(const char *path);
/// Blocks every signal in the calling thread except those in none; returns 0 on success.
int guest_block_signal(int signo);
/// Restores the default disposition and an empty mask (in a child, before exec).
void guest_reset_signals(void);
/// pipe2(2) with O_CLOEXEC; 0 on success.
int guest_pipe(int fds[2]);
/// Powers the machine off (reboot(2) with RB_POWER_OFF).
int guest_power_off(void);

// Mixes host randomness into the kernel pool and reseeds its generator; 0 or -errno.
int guest_reseed_random(const unsigned char *bytes, int length);

// The filesystem type (statfs f_type) of the file system holding `path`; -errno on failure.
long guest_filesystem_type(const char *path);
