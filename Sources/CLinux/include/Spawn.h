// Starting helper processes (passt) that must not outlive the thread that starts them.
#ifndef SWIFTLET_SPAWN_H
#define SWIFTLET_SPAWN_H

#include <sys/types.h>

/// Forks and executes `path` with `argv` and `envp` (NULL-terminated). The child's descriptor i is
/// `descriptors[i]` of the caller for i < `count` (0, 1 and 2 are its standard streams), and it
/// has no other descriptor. Before execve the child, calling only async-signal-safe functions:
/// asks for `death_signal` when the calling *thread* ends (PR_SET_PDEATHSIG), ends at once if the
/// caller's process is already gone, starts a session of its own when `new_session`, puts its
/// descriptors in place, closes every other one, and sets every signal to its default action,
/// unblocked. Returns the child's pid once it has executed `path`; or -1 with errno set to why
/// it could not (the child's own failure, ENOENT for a missing executable, say, after reaping it).
pid_t swiftlet_spawn_helper(const char *path, char *const argv[], char *const envp[],
                            const int *descriptors, int count, int death_signal, int new_session);

/// waitid(P_PID, pid, WEXITED | WNOWAIT), retried on EINTR: waits until `pid` has ended without
/// reaping it (its pid stays taken, so a signal sent meanwhile cannot reach another process).
/// Returns 0, or -1 with errno.
int swiftlet_wait_exited(pid_t pid);

/// waitpid(pid, &status, 0), retried on EINTR: reaps `pid`. Returns its wait status, or -1 with errno.
int swiftlet_reap(pid_t pid);

/// kill(2) (the Glibc module hides nothing here; a shim keeps every signal to a process in one place).
int swiftlet_kill(pid_t pid, int signo);

/// memfd_create(name, MFD_CLOEXEC): an anonymous file in memory (a helper's captured output).
int swiftlet_memfd(const char *name);

/// The wait status's parts (macros in <sys/wait.h>).
int swiftlet_wait_exited_normally(int status);
int swiftlet_wait_exit_status(int status);
int swiftlet_wait_signaled(int status);
int swiftlet_wait_term_signal(int status);

#endif
