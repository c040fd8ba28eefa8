// CLinux: the Linux kernel headers Swiftlet needs, and small shims for what Swift cannot import
// (ioctl request macros, variadic ioctl, unions inside struct kvm_run).
#ifndef SWIFTLET_CLINUX_H
#define SWIFTLET_CLINUX_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <signal.h>
#include <termios.h>
#include <sys/vfs.h>
#include <sys/xattr.h>
#include "Spawn.h"

// MARK: ioctl request numbers (the _IO* macros do not import into Swift)
extern const unsigned long SWIFTLET_KVM_GET_API_VERSION;
extern const unsigned long SWIFTLET_KVM_CREATE_VM;
extern const unsigned long SWIFTLET_KVM_CHECK_EXTENSION;
extern const unsigned long SWIFTLET_KVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long SWIFTLET_KVM_GET_SUPPORTED_CPUID;
extern const unsigned long SWIFTLET_KVM_GET_MSR_INDEX_LIST;
extern const unsigned long SWIFTLET_KVM_CREATE_VCPU;
extern const unsigned long SWIFTLET_KVM_SET_USER_MEMORY_REGION;
extern const unsigned long SWIFTLET_KVM_SET_TSS_ADDR;
extern const unsigned long SWIFTLET_KVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long SWIFTLET_KVM_CREATE_IRQCHIP;
extern const unsigned long SWIFTLET_KVM_CREATE_PIT2;
extern const unsigned long SWIFTLET_KVM_IRQ_LINE;
extern const unsigned long SWIFTLET_KVM_IRQFD;
extern const unsigned long SWIFTLET_KVM_IOEVENTFD;
extern const unsigned long SWIFTLET_KVM_GET_DIRTY_LOG;
extern const unsigned long SWIFTLET_KVM_GET_IRQCHIP;
extern const unsigned long SWIFTLET_KVM_SET_IRQCHIP;
extern const unsigned long SWIFTLET_KVM_GET_PIT2;
extern const unsigned long SWIFTLET_KVM_SET_PIT2;
extern const unsigned long SWIFTLET_KVM_GET_CLOCK;
extern const unsigned long SWIFTLET_KVM_SET_CLOCK;
extern const unsigned long SWIFTLET_KVM_ENABLE_CAP;
extern const unsigned long SWIFTLET_KVM_RUN;
extern const unsigned long SWIFTLET_KVM_GET_REGS;
extern const unsigned long SWIFTLET_KVM_SET_REGS;
extern const unsigned long SWIFTLET_KVM_GET_SREGS;
extern const unsigned long SWIFTLET_KVM_SET_SREGS;
extern const unsigned long SWIFTLET_KVM_GET_FPU;
extern const unsigned long SWIFTLET_KVM_SET_FPU;
extern const unsigned long SWIFTLET_KVM_GET_MSRS;
extern const unsigned long SWIFTLET_KVM_SET_MSRS;
extern const unsigned long SWIFTLET_KVM_SET_CPUID2;
extern const unsigned long SWIFTLET_KVM_GET_CPUID2;
extern const unsigned long SWIFTLET_KVM_GET_LAPIC;
extern const unsigned long SWIFTLET_KVM_SET_LAPIC;
extern const unsigned long SWIFTLET_KVM_GET_MP_STATE;
extern const unsigned long SWIFTLET_KVM_SET_MP_STATE;
extern const unsigned long SWIFTLET_KVM_GET_VCPU_EVENTS;
extern const unsigned long SWIFTLET_KVM_SET_VCPU_EVENTS;
extern const unsigned long SWIFTLET_KVM_GET_XSAVE;
extern const unsigned long SWIFTLET_KVM_SET_XSAVE;
extern const unsigned long SWIFTLET_KVM_GET_XCRS;
extern const unsigned long SWIFTLET_KVM_SET_XCRS;
extern const unsigned long SWIFTLET_KVM_GET_DEBUGREGS;
extern const unsigned long SWIFTLET_KVM_SET_DEBUGREGS;
extern const unsigned long SWIFTLET_KVM_TRANSLATE;
extern const unsigned long SWIFTLET_KVM_KVMCLOCK_CTRL;
extern const unsigned long SWIFTLET_KVM_GET_TSC_KHZ;
extern const unsigned long SWIFTLET_KVM_SET_TSC_KHZ;
extern const unsigned long SWIFTLET_TIOCGWINSZ;

// MARK: calls Swift cannot make directly

/// ioctl(2) with a pointer argument (glibc's ioctl is variadic, which Swift cannot call).
int swiftlet_ioctl_ptr(int fd, unsigned long request, void *arg);
/// ioctl(2) with an integer argument.
int swiftlet_ioctl_int(int fd, unsigned long request, unsigned long arg);
/// open(2) with O_CLOEXEC and the given flags and mode (open is variadic too).
int swiftlet_open(const char *path, int flags, unsigned int mode);
/// openat2(2) with an open_how of these values (RESOLVE_* from linux/openat2.h); EINTR retried.
int swiftlet_openat2(int directory, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);
/// getdents64(2): linux_dirent64 records into `buffer`.
long swiftlet_getdents64(int fd, void *buffer, unsigned long length);
static const uint64_t SWIFTLET_RESOLVE_BENEATH = 0x08;
static const uint64_t SWIFTLET_RESOLVE_NO_MAGICLINKS = 0x02;
static const uint64_t SWIFTLET_RESOLVE_NO_SYMLINKS = 0x04;
static const uint64_t SWIFTLET_RESOLVE_NO_XDEV = 0x01;
/* GNU and Linux names the Glibc module hides (it is built without _GNU_SOURCE). */
static const int SWIFTLET_O_PATH = 010000000;
static const int SWIFTLET_AT_EMPTY_PATH = 0x1000;
static const long SWIFTLET_UTIME_NOW = (1l << 30) - 1l;
static const long SWIFTLET_UTIME_OMIT = (1l << 30) - 2l;
static const int SWIFTLET_SEEK_DATA = 3;
static const int SWIFTLET_SEEK_HOLE = 4;
/// renameat2(2) (RENAME_NOREPLACE 1, RENAME_EXCHANGE 2).
int swiftlet_renameat2(int from_directory, const char *from, int to_directory, const char *to, unsigned int flags);
/// fallocate(2) with its mode bits.
int swiftlet_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// mkostemp(3) (a GNU extension the Glibc module hides): a new file from `template`, with `flags`.
int swiftlet_mkostemp(char *template_path, int flags);
/* getrandom(2): glibc declares it in <sys/random.h>, which Swift's Glibc module does not export. */
long swiftlet_getrandom(void *buffer, unsigned long length, unsigned int flags);
/// Executes CPUID on the host CPU.
void swiftlet_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
/// Whether the host CPU has AVX2 and the kernel enabled its registers (what a program built for
/// AVX2, such as Debian's passt.avx2, needs).
int swiftlet_host_has_avx2(void);
/// Unblocks `signo` for the calling thread (threads inherit their creator's mask, and Swift
/// concurrency's worker threads block most signals).
int swiftlet_unblock_signal(int signo);
/// Blocks `signals` (count of them) in the calling thread and returns a non-blocking signalfd that
/// receives them; -1 on error.
int swiftlet_signalfd(const int *signals, int count);
/// Reads one signal from a signalfd: its number, or -1.
int swiftlet_read_signal(int fd);
/// SIGRTMIN (a function-like macro in glibc).
int swiftlet_sigrtmin(void);
/// Names the calling thread (pthread_setname_np needs _GNU_SOURCE).
void swiftlet_set_thread_name(const char *name);
/// The calling thread's kernel thread id.
int swiftlet_gettid(void);

/// CLOCK_MONOTONIC in nanoseconds, taken by a constructor as the process's code starts running.
uint64_t swiftlet_process_start_ns(void);
/// CLOCK_MONOTONIC now, in nanoseconds.
uint64_t swiftlet_monotonic_ns(void);

/// A listening Unix stream socket bound at `path` (close-on-exec); -1 with errno on error
/// (ENAMETOOLONG when the path does not fit sockaddr_un).
int swiftlet_unix_listen(const char *path, int backlog);
/// accept4(2) with SOCK_CLOEXEC (a GNU extension), retried on EINTR.
int swiftlet_accept(int listener);
/// pipe2(2) with O_CLOEXEC (a GNU extension).
int swiftlet_pipe(int fds[2]);
/// A Unix stream socket connected to `path` (close-on-exec); -1 with errno on error.
int swiftlet_unix_connect(const char *path);
/// A TCP socket listening on `host` (numeric or a name; NULL: every address) and `port` (0: any
/// free port), close-on-exec, SO_REUSEADDR; -1 with errno, or -2 with `*resolve_error` set
/// (getaddrinfo's code) when the host cannot be resolved.
int swiftlet_tcp_listen(const char *host, unsigned short port, int backlog, int *resolve_error);
/// A blocking TCP socket connected to `host`:`port` within `timeout_ms` per address, with
/// TCP_NODELAY, close-on-exec; -1 with errno, or -2 with `*resolve_error` set.
int swiftlet_tcp_connect(const char *host, unsigned short port, int timeout_ms, int *resolve_error);
/// The local port a TCP socket is bound to, or -1 with errno.
int swiftlet_tcp_port(int fd);
/// Sets TCP_NODELAY (best effort).
void swiftlet_tcp_nodelay(int fd);
/// getaddrinfo's text for an error code.
const char *swiftlet_resolve_error(int code);
/// Sends `length` bytes (at least one) with `count` descriptors attached (SCM_RIGHTS); the bytes
/// sent, or -1 with errno.
long swiftlet_send_with_fds(int socket, const void *bytes, unsigned long length, const int *fds, int count);
/// Receives up to `length` bytes and up to `capacity` attached descriptors (made close-on-exec),
/// stored in `fds` with their number in `*count`; the bytes received, or -1 with errno. When more
/// descriptors arrive than `capacity` (or than fit the control buffer, MSG_CTRUNC), every one of
/// them is closed, `*count` is 0, and the call fails with EMSGSIZE.
long swiftlet_receive_with_fds(int socket, void *bytes, unsigned long length, int *fds, int capacity, int *count);

// MARK: userfaultfd (lazily filled memory)

/// A userfaultfd (close-on-exec, non-blocking) that has done its API handshake and can report
/// missing-page faults and fill them (UFFDIO_COPY, UFFDIO_ZEROPAGE): the userfaultfd(2) system
/// call, else /dev/userfaultfd (Linux 6.1+) when the call is refused. Faults the kernel takes
/// on the process's behalf (KVM, read(2) into the memory) are reported too. -1 with errno.
int swiftlet_uffd_open(void);
/// Registers [start, start + length) (page-aligned, anonymous memory) for missing-page faults;
/// 0, or -1 with errno (ENOTSUP when the range cannot be filled by copy and zero page).
int swiftlet_uffd_register(int fd, uint64_t start, uint64_t length);
/// Reads the next event: 1 with the faulting address in `*address` for a page fault, 0 for
/// another event, -1 with errno (EAGAIN: none pending).
int swiftlet_uffd_read_fault(int fd, uint64_t *address);
/// Fills the missing pages of [destination, destination + length) with a copy of `source` and
/// wakes the threads waiting on them; 0, or -1 with errno (EEXIST: a page was already there).
int swiftlet_uffd_copy(int fd, uint64_t destination, const void *source, uint64_t length);
/// Maps the zero page over the missing pages of [destination, destination + length) and wakes
/// the threads waiting on them; 0, or -1 with errno.
int swiftlet_uffd_zero(int fd, uint64_t destination, uint64_t length);
/// Wakes the threads waiting on [start, start + length) (pages another fill made present).
int swiftlet_uffd_wake(int fd, uint64_t start, uint64_t length);

/// Installs a do-nothing handler (without SA_RESTART) for `signo`, so that sending it to a thread
/// interrupts a blocking system call such as KVM_RUN with EINTR.
int swiftlet_install_wakeup_signal(int signo);

// MARK: atomics on plain memory (bitmaps shared between threads)
static inline void swiftlet_atomic_or_u64(uint64_t *word, uint64_t bits) { __atomic_fetch_or(word, bits, __ATOMIC_RELAXED); }
static inline uint64_t swiftlet_atomic_take_u64(uint64_t *word) { return __atomic_exchange_n(word, 0, __ATOMIC_ACQ_REL); }

// MARK: struct kvm_run union accessors
static inline struct kvm_run *swiftlet_run(void *p) { return (struct kvm_run *)p; }
static inline __u8 swiftlet_run_io_direction(const struct kvm_run *r) { return r->io.direction; }
static inline __u8 swiftlet_run_io_size(const struct kvm_run *r) { return r->io.size; }
static inline __u16 swiftlet_run_io_port(const struct kvm_run *r) { return r->io.port; }
static inline __u32 swiftlet_run_io_count(const struct kvm_run *r) { return r->io.count; }
static inline __u64 swiftlet_run_io_data_offset(const struct kvm_run *r) { return r->io.data_offset; }
static inline __u64 swiftlet_run_mmio_phys_addr(const struct kvm_run *r) { return r->mmio.phys_addr; }
static inline __u8 *swiftlet_run_mmio_data(struct kvm_run *r) { return r->mmio.data; }
static inline __u32 swiftlet_run_mmio_len(const struct kvm_run *r) { return r->mmio.len; }
static inline __u8 swiftlet_run_mmio_is_write(const struct kvm_run *r) { return r->mmio.is_write; }
static inline __u32 swiftlet_run_internal_suberror(const struct kvm_run *r) { return r->internal.suberror; }
static inline __u32 swiftlet_run_internal_ndata(const struct kvm_run *r) { return r->internal.ndata; }
static inline __u64 swiftlet_run_internal_data(const struct kvm_run *r, __u32 i) { return i < 16 ? r->internal.data[i] : 0; }
static inline __u64 swiftlet_run_emulation_flags(const struct kvm_run *r) { return r->emulation_failure.flags; }
static inline __u8 swiftlet_run_emulation_insn_size(const struct kvm_run *r) { return r->emulation_failure.insn_size; }
static inline const __u8 *swiftlet_run_emulation_insn_bytes(const struct kvm_run *r) { return r->emulation_failure.insn_bytes; }
static inline __u32 swiftlet_run_system_event_type(const struct kvm_run *r) { return r->system_event.type; }
static inline __u64 swiftlet_run_fail_entry_reason(const struct kvm_run *r) { return r->fail_entry.hardware_entry_failure_reason; }
static inline __u32 swiftlet_run_exception(const struct kvm_run *r) { return r->ex.exception; }

// MARK: seccomp and privileges (Seccomp.c, SyscallNames.c)
#include <linux/filter.h>
#include <linux/seccomp.h>

/// AUDIT_ARCH_X86_64 (a macro Swift cannot import): seccomp_data.arch on x86_64.
extern const uint32_t SWIFTLET_AUDIT_ARCH_X86_64;
/// prctl(PR_SET_NO_NEW_PRIVS, 1): no execve(2) of this process gains privileges again.
int swiftlet_set_no_new_privileges(void);
/// seccomp(SECCOMP_SET_MODE_FILTER, flags, program of `count` sock_filter instructions).
long swiftlet_seccomp_install(const void *instructions, unsigned short count, unsigned int flags);
/// Installs the SIGSYS handler that reports a call a SECCOMP_RET_TRAP filter refused
/// ("swiftlet: seccomp: forbidden system call N (name)" on standard error) and ends the process.
int swiftlet_install_sigsys_reporter(void);
/// Unblocks SIGSYS on the calling thread.
int swiftlet_unblock_sigsys(void);
/// Clears the calling thread's effective, permitted and inheritable capabilities (threads it
/// starts afterwards inherit the empty sets).
int swiftlet_drop_capabilities(void);
/// 1 when the calling thread has any effective or permitted capability, 0 when none, -1 on error.
int swiftlet_has_capabilities(void);
/// prlimit(2) on RLIMIT_NOFILE of process `pid`: sets soft and hard to `*soft` and `*hard`
/// and returns the old values in them (tests lower another process's limit).
int swiftlet_swap_descriptor_limit(int pid, unsigned long long *soft, unsigned long long *hard);
/// personality(0xffffffff): a query with no effect, which the VMM's filter does not allow (a test hook).
long swiftlet_forbidden_call_for_tests(void);
/// The ioctl requests a VMM makes (KVM, terminals, FIO*, BLKGETSIZE64); `count` is set to their number.
const unsigned long *swiftlet_vmm_ioctl_requests(int *count);
/// The x86_64 system call named `number`, or NULL.
const char *swiftlet_syscall_name(long number);
/// The x86_64 number of the system call `name`, or -1.
long swiftlet_syscall_number(const char *name);

#endif
