/* The guest side of `make bench-migrate` (bench/migrate-host.sh): a memory writer at a set rate
 * and the guest's own measure of a migration's pause.
 *
 *   migratebench RATE_MIB [BUFFER_MIB]
 *
 * Every 10 ms (an absolute CLOCK_MONOTONIC schedule) it writes one byte into each of
 * RATE_MIB * 256 / 100 pages of a BUFFER_MIB buffer (default 64 MiB), round and round, so the
 * guest dirties RATE_MIB MiB of memory a second (0: none; only the clock is watched). It measures
 * how long each sleep really took: a tick that comes more than 10 ms after the one before shows
 * a stop the guest lived through (a migration's pause, by the guest's own clock, when the VMM
 * moves that clock on by the time it was paused).
 *
 * Once a second it prints `gap_us G rate_mib_s R`: the largest excess G of that second's ticks
 * over 10 ms, and the rate R it reached. On SIGUSR1 it empties its output, if that is a file,
 * and prints `mark` (the host sends one before each migration and reads what follows).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t marked;

static void on_usr1(int sig) { (void)sig; marked = 1; }

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: migratebench RATE_MIB [BUFFER_MIB]\n");
        return 2;
    }
    long rate = atol(argv[1]);
    long buffer_mib = argc > 2 ? atol(argv[2]) : 64;
    if (rate < 0 || rate > 100000 || buffer_mib < 1 || buffer_mib > 4096) {
        fprintf(stderr, "migratebench: bad rate or buffer size\n");
        return 2;
    }
    const long page = 4096;
    const long long tick_ns = 10000000LL, window_ns = 1000000000LL;
    long pages = buffer_mib * 256, per_tick = rate * 256 / 100;
    unsigned char *buffer = mmap(NULL, (size_t)pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED) {
        perror("migratebench: mmap");
        return 1;
    }
    memset(buffer, 1, (size_t)pages * page); /* all of it present before the first tick */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_usr1;
    sigaction(SIGUSR1, &action, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);

    long next_page = 0, written = 0;
    long long last = now_ns(), deadline = last, window_start = last, max_gap = 0;
    unsigned char value = 2;
    for (;;) {
        for (long i = 0; i < per_tick; i++) {
            buffer[next_page * page] = value;
            if (++next_page == pages) { next_page = 0; value++; }
        }
        written += per_tick;
        deadline += tick_ns;
        struct timespec until = { (time_t)(deadline / 1000000000LL), (long)(deadline % 1000000000LL) };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) != 0) {}
        long long now = now_ns();
        if (marked) {
            marked = 0;
            if (ftruncate(STDOUT_FILENO, 0) == 0) lseek(STDOUT_FILENO, 0, SEEK_SET);
            printf("mark\n");
        }
        long long gap = now - last - tick_ns;
        last = now;
        if (gap > max_gap) max_gap = gap;
        if (now - deadline > window_ns) deadline = now; /* after a long stop, no burst to catch up */
        if (now - window_start >= window_ns) {
            double seconds = (double)(now - window_start) / 1e9;
            printf("gap_us %lld rate_mib_s %.1f\n", max_gap / 1000, (double)written / 256.0 / seconds);
            window_start = now;
            written = 0;
            max_gap = 0;
        }
    }
}
