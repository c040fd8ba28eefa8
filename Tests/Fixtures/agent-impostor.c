// agent-impostor: an ordinary guest process that tries to pose as Swiftlet's guest agent
// (AgentImpostorIntegrationTests). Run as an unprivileged user in a guest:
//   agent-impostor VERSION SECONDS
// prints what the kernel let it do: `bind 1000: ...` (binding a privileged vsock port), then
// `connect: ok` or `connect: <error>` (connecting to the host's agent port, CID 2 port 1024, from
// an ordinary port). It then leaves a child behind, in a session of its own, that for SECONDS
// keeps connecting and, on every connection the host takes, plays the agent: says `ready`
// (protocol VERSION), answers a challenge with a made-up proof and every command with the output
// "forged" and status 0. What the host sends it goes to /tmp/impostor.log ("key" for an agent key,
// "exec" for a command). Built static (the default image has no C library) by scripts/test-nested.
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static unsigned version;

static int put(int fd, const unsigned char *bytes, size_t count) {
    while (count > 0) {
        ssize_t n = write(fd, bytes, count);
        if (n <= 0) return -1;
        bytes += n; count -= (size_t)n;
    }
    return 0;
}

static void le32(unsigned char *p, unsigned v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }

// One frame: tag, then `count` bytes of fields.
static int frame(int fd, unsigned char tag, const unsigned char *fields, unsigned count) {
    unsigned char head[5];
    le32(head, count + 1);
    head[4] = tag;
    return put(fd, head, 5) || put(fd, fields, count);
}

static int get(int fd, unsigned char *bytes, size_t count) {
    while (count > 0) {
        ssize_t n = read(fd, bytes, count);
        if (n <= 0) return -1;
        bytes += n; count -= (size_t)n;
    }
    return 0;
}

static void note(const char *what) {
    int log = open("/tmp/impostor.log", O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (log >= 0) { (void)!write(log, what, strlen(what)); (void)!write(log, "\n", 1); close(log); }
}

static int connect_to_host(void) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct sockaddr_vm host = { .svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = 1024 };
    if (connect(s, (struct sockaddr *)&host, sizeof host) != 0) { int e = errno; close(s); errno = e; return -1; }
    return s;
}

// Plays the agent on `s` until the host hangs up.
static void pose(int s) {
    note("connected");
    unsigned char fields[4];
    le32(fields, version);
    if (frame(s, 1, fields, 4)) return; // ready
    static unsigned char body[1 << 20];
    for (;;) {
        unsigned char head[4];
        if (get(s, head, 4)) return;
        unsigned length = head[0] | head[1] << 8 | head[2] << 16 | (unsigned)head[3] << 24;
        if (length < 1 || length > sizeof body || get(s, body, length)) return;
        switch (body[0]) {
        case 40: note("key"); break;
        case 41: { // challenge: a proof of 32 bytes that only a guess could make right
            unsigned char proof[36] = { 0 };
            le32(proof, 32);
            if (frame(s, 8, proof, 36)) return;
            break;
        }
        case 32: { // exec
            note("exec");
            unsigned char out[4 + 7];
            le32(out, 7);
            memcpy(out + 4, "forged\n", 7);
            unsigned char status[4] = { 0 };
            if (frame(s, 3, out, sizeof out) || frame(s, 5, status, 4)) return;
            break;
        }
        default: break;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: agent-impostor VERSION SECONDS\n"); return 2; }
    version = (unsigned)atoi(argv[1]);
    int seconds = atoi(argv[2]);
    signal(SIGPIPE, SIG_IGN);

    int b = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm privileged = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 1000 };
    printf("bind 1000: %s\n", bind(b, (struct sockaddr *)&privileged, sizeof privileged) == 0 ? "ok" : strerror(errno));
    close(b);
    int first = connect_to_host();
    printf("connect: %s\n", first >= 0 ? "ok" : strerror(errno));
    fflush(stdout);

    pid_t child = fork();
    if (child != 0) return child < 0;
    setsid();
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0); dup2(null, 1); dup2(null, 2);
    if (first >= 0) {
        if (fork() == 0) { pose(first); _exit(0); }
        close(first);
    }
    time_t end = time(NULL) + seconds;
    while (time(NULL) < end) {
        int s = connect_to_host();
        if (s >= 0) {
            if (fork() == 0) { pose(s); _exit(0); }
            close(s);
        }
        usleep(20000);
    }
    return 0;
}
