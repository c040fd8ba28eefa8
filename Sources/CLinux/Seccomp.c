// Seccomp and privilege shims: installing a BPF filter, reporting a forbidden system call from
// the SIGSYS handler (async-signal-safe: write(2) and _exit(2) only), dropping capabilities.
#include "CLinux.h"
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <linux/fs.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>

const uint32_t SWIFTLET_AUDIT_ARCH_X86_64 = AUDIT_ARCH_X86_64;

// Every ioctl request Swiftlet makes of /dev/kvm, a VM and a vCPU (the requests CLinux.h exports)
// and of terminals, files and block devices: the VMM's seccomp filter allows ioctl with these only.
static const unsigned long ioctl_requests[] = {
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CREATE_VCPU,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_IRQ_LINE,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_GET_DIRTY_LOG,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_GET_CLOCK,
    KVM_SET_CLOCK,
    KVM_ENABLE_CAP,
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_SET_CPUID2,
    KVM_GET_CPUID2,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_TRANSLATE,
    KVM_KVMCLOCK_CTRL,
    KVM_GET_TSC_KHZ,
    KVM_SET_TSC_KHZ,
    TIOCGWINSZ,
    TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGPGRP, FIONREAD, FIONBIO, FIOCLEX, FIONCLEX,
    BLKGETSIZE64,
    // A lazily restored machine's memory is filled by a thread of the VMM's (LazyMemory).
    UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE,
};

const unsigned long *swiftlet_vmm_ioctl_requests(int *count) {
    *count = (int)(sizeof ioctl_requests / sizeof ioctl_requests[0]);
    return ioctl_requests;
}

int swiftlet_set_no_new_privileges(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }

long swiftlet_seccomp_install(const void *instructions, unsigned short count, unsigned int flags) {
    struct sock_fprog program = { .len = count, .filter = (struct sock_filter *)instructions };
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &program);
}

static void append(char *buffer, size_t *length, size_t capacity, const char *text) {
    while (*text && *length < capacity) buffer[(*length)++] = *text++;
}

static void swiftlet_report_forbidden_call(int signo, siginfo_t *info, void *context) {
    (void)signo; (void)context;
    char line[256];
    size_t length = 0;
    append(line, &length, sizeof line, "swiftlet: seccomp: forbidden system call ");
    long number = info->si_syscall;
    char digits[24];
    int count = 0;
    unsigned long value = number < 0 ? 0 : (unsigned long)number;
    do { digits[count++] = (char)('0' + value % 10); value /= 10; } while (value && count < (int)sizeof digits);
    while (count > 0 && length < sizeof line) line[length++] = digits[--count];
    const char *name = swiftlet_syscall_name(number);
    append(line, &length, sizeof line, " (");
    append(line, &length, sizeof line, name ? name : "unknown");
    append(line, &length, sizeof line, "): the process ends (SWIFTLET_SECCOMP=off runs without the filter, for debugging)\n");
    ssize_t ignored = write(2, line, length);
    (void)ignored;
    _exit(128 + SIGSYS);
}

int swiftlet_install_sigsys_reporter(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = swiftlet_report_forbidden_call;
    sigfillset(&action.sa_mask);
    action.sa_flags = SA_SIGINFO;
    return sigaction(SIGSYS, &action, NULL);
}

int swiftlet_unblock_sigsys(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int swiftlet_drop_capabilities(void) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &header, data);
}

int swiftlet_has_capabilities(void) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++) if (data[i].effective || data[i].permitted) return 1;
    return 0;
}

long swiftlet_forbidden_call_for_tests(void) { return syscall(SYS_personality, 0xffffffffUL); }
