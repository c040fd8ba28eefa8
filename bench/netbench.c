/* netbench: the small helper `make bench-net` (scripts/bench-net) runs in the guest and in the
 * nested test host. Built static (the benchmark guest has no C library of its own for it).
 *
 *   netbench echo PORT            accept one TCP connection on 0.0.0.0:PORT, echo it until EOF, exit
 *   netbench rr HOST PORT N SIZE  connect (retrying for up to 60 s), then N round trips of SIZE
 *                                 bytes (after N/10 warm-up ones); prints "rr_us p50=X p90=Y n=N"
 *   netbench time CMD ARGS...     runs CMD and prints "elapsed_ms X status S" to stderr
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int full(int fd, char *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int echo_server(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("netbench echo: bind/listen"); return 1; }
    printf("netbench-echo-ready\n");
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    if (c < 0) { perror("netbench echo: accept"); return 1; }
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char buf[65536];
    for (;;) {
        ssize_t r = read(c, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        if (full(c, buf, (size_t)r, 1)) break;
    }
    close(c);
    close(s);
    return 0;
}

static int rr_client(const char *host, int port, int n, int size) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { fprintf(stderr, "netbench rr: bad address %s\n", host); return 1; }
    if (n < 1 || size < 1 || size > 65536) { fprintf(stderr, "netbench rr: bad N or SIZE\n"); return 1; }
    int c = -1, one = 1;
    double deadline = now_us() + 60e6;
    char probe;
    for (;;) {
        c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a) == 0) {
            /* passt accepts on the host side before the guest does: a connection the guest
             * refuses ends at once, so test it with a first round trip. */
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            probe = 'p';
            if (write(c, &probe, 1) == 1 && read(c, &probe, 1) == 1) break;
        }
        close(c);
        if (now_us() > deadline) { fprintf(stderr, "netbench rr: cannot reach %s:%d\n", host, port); return 1; }
        usleep(100000);
    }
    char *buf = malloc((size_t)size);
    double *samples = malloc(sizeof(double) * (size_t)n);
    memset(buf, 'x', (size_t)size);
    int warm = n / 10;
    for (int i = -warm; i < n; i++) {
        double t0 = now_us();
        if (full(c, buf, (size_t)size, 1) || full(c, buf, (size_t)size, 0)) { fprintf(stderr, "netbench rr: connection lost\n"); return 1; }
        if (i >= 0) samples[i] = now_us() - t0;
    }
    close(c);
    qsort(samples, (size_t)n, sizeof(double), cmp);
    printf("rr_us p50=%.1f p90=%.1f n=%d\n", samples[(n - 1) / 2], samples[(n * 9 - 1) / 10], n);
    return 0;
}

static int time_command(char **argv) {
    double t0 = now_us();
    pid_t p = fork();
    if (p == 0) { execvp(argv[0], argv); perror("netbench time: exec"); _exit(127); }
    int status = 0;
    waitpid(p, &status, 0);
    fprintf(stderr, "elapsed_ms %.2f status %d\n", (now_us() - t0) / 1e3, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "echo")) return echo_server(atoi(argv[2]));
    if (argc >= 6 && !strcmp(argv[1], "rr")) return rr_client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc >= 3 && !strcmp(argv[1], "time")) return time_command(argv + 2);
    fprintf(stderr, "usage: netbench echo PORT | rr HOST PORT N SIZE | time CMD ARGS...\n");
    return 2;
}
