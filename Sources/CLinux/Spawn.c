// Fork and exec of helper processes. Between fork and execve the child of a multithreaded process
// may call only async-signal-safe functions: here raw system calls, no allocation, no locks.
#define _GNU_SOURCE
#include "Spawn.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/close_range.h>

/// The most descriptors a helper gets in place (its standard streams and a few more).
#define SPAWN_MAX_DESCRIPTORS 16

/// Reports `error` to the parent through `report` and ends the child.
static void child_fail(int report, int error) {
    while (write(report, &error, sizeof error) < 0 && errno == EINTR) {}
    _exit(127);
}

/// Closes descriptors from `first` through `last`: close_range(2), else one by one.
static void close_from(unsigned int first, unsigned int last) {
    if (first > last) return;
    if (syscall(SYS_close_range, first, last, 0) == 0) return;
    // Before Linux 5.9: up to the descriptor limit.
    long limit = sysconf(_SC_OPEN_MAX);
    if (limit < 0 || limit > 1 << 20) limit = 1 << 20;
    for (unsigned long fd = first; fd <= last && fd < (unsigned long)limit; fd++) close((int)fd);
}

static void child(const char *path, char *const argv[], char *const envp[], const int *descriptors, int count,
                  int death_signal, int new_session, pid_t parent, int report) {
    // Die with the thread that forked us; if the parent already went before this took effect,
    // nobody will send it: check and go.
    if (death_signal > 0) {
        if (prctl(PR_SET_PDEATHSIG, (unsigned long)death_signal, 0, 0, 0) != 0) child_fail(report, errno);
        if (getppid() != parent) _exit(127);
    }
    if (new_session && setsid() < 0) child_fail(report, errno);
    // Move the report pipe and every source above the target range first, so that putting
    // descriptor i in place never overwrites a source still needed.
    int high = count > 3 ? count : 3;
    int moved_report = fcntl(report, F_DUPFD_CLOEXEC, high);
    if (moved_report < 0) child_fail(report, errno);
    report = moved_report;
    int moved[SPAWN_MAX_DESCRIPTORS];
    for (int i = 0; i < count; i++) {
        moved[i] = fcntl(descriptors[i], F_DUPFD_CLOEXEC, high + 1);
        if (moved[i] < 0) child_fail(report, errno);
    }
    for (int i = 0; i < count; i++) {
        // dup2 clears close-on-exec on the target.
        if (dup2(moved[i], i) < 0) child_fail(report, errno);
    }
    // Put the report pipe right after the kept descriptors and close everything else (including
    // the moved copies). It stays close-on-exec: a successful execve closes it.
    if (report != count) {
        if (dup3(report, count, O_CLOEXEC) < 0) child_fail(report, errno);
        report = count;
    }
    close_from((unsigned int)count + 1, ~0U);
    // Default actions for every signal (ignored ones would stay ignored across execve), then
    // nothing blocked (the caller blocked everything around fork).
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int signo = 1; signo < _NSIG; signo++) {
        if (signo == SIGKILL || signo == SIGSTOP) continue;
        (void)sigaction(signo, &dfl, NULL);  // fails harmlessly for glibc's reserved signals
    }
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) != 0) child_fail(report, errno);
    execve(path, argv, envp);
    child_fail(report, errno);
}

pid_t swiftlet_spawn_helper(const char *path, char *const argv[], char *const envp[],
                            const int *descriptors, int count, int death_signal, int new_session) {
    if (count < 0 || count > SPAWN_MAX_DESCRIPTORS) { errno = EINVAL; return -1; }
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return -1;
    pid_t parent = getpid();
    // No signal handler may run in the child before its dispositions are reset.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = fork();
    if (pid == 0) {
        close(report[0]);
        child(path, argv, envp, descriptors, count, death_signal, new_session, parent, report[1]);
        _exit(127);
    }
    int fork_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(report[1]);
    if (pid < 0) {
        close(report[0]);
        errno = fork_errno;
        return -1;
    }
    // EOF: the child executed `path` (the pipe was close-on-exec) or died before it could say.
    int child_errno = 0;
    ssize_t got;
    do { got = read(report[0], &child_errno, sizeof child_errno); } while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof child_errno) {
        (void)swiftlet_reap(pid);
        errno = child_errno;
        return -1;
    }
    return pid;
}

int swiftlet_wait_exited(pid_t pid) {
    siginfo_t info;
    int result;
    do {
        memset(&info, 0, sizeof info);
        result = waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT);
    } while (result < 0 && errno == EINTR);
    return result;
}

int swiftlet_reap(pid_t pid) {
    int status = 0;
    pid_t result;
    do { result = waitpid(pid, &status, 0); } while (result < 0 && errno == EINTR);
    return result < 0 ? -1 : status;
}

int swiftlet_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int swiftlet_kill(pid_t pid, int signo) { return kill(pid, signo); }

int swiftlet_wait_exited_normally(int status) { return WIFEXITED(status); }
int swiftlet_wait_exit_status(int status) { return WEXITSTATUS(status); }
int swiftlet_wait_signaled(int status) { return WIFSIGNALED(status); }
int swiftlet_wait_term_signal(int status) { return WTERMSIG(status); }
