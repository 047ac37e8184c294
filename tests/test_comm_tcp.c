/* The tcp data plane (src/comm/comm.h) between real processes: every test forks W children that
 * open a data plane on tcp://127.0.0.1:*, report their endpoints to the parent through a pipe,
 * receive everybody's endpoints back, and run a scenario. Expected values are computed
 * independently in each child from deterministic generators (content hashes, sequential sums
 * in rank order); the parent checks exit codes and kills stragglers after a deadline.
 *
 * Covered: W = 1..4 alltoallv (uneven and empty chunks, multi-chunk streams), allreduce f32/f64
 * (bit-identical to the ordered sum s = x_0 + x_1 + ... on every rank), broadcast from a
 * non-zero root, barrier; 100 back-to-back collectives without barriers (sequencing, stashing
 * of a fast peer's next round) including > 10 MB payloads; a dead peer (exited, SIGKILLed,
 * SIGSTOPped) gives SY_ETIMEOUT within the bound, naming the rank; abort from another thread;
 * stale generation-1 traffic arriving during generation 2. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <sched.h>

#include "base/bgsched.h"
#include "comm/comm.h"
#include "sy_test.h"

#define EP_LEN 256
#define MAX_W 8
#define CHILD_DEADLINE_MS 20000

/* ---------------------------------------------------------------- harness */

typedef int (*scenario_fn)(int rank, int world, sy_dataplane_t *dp, const char *const *eps);

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool read_full(int fd, void *buf, size_t n, int timeout_ms) {
    char *p = buf;
    int64_t end = now_ms() + timeout_ms;
    while (n) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int left = (int)(end - now_ms());
        if (left <= 0 || poll(&pf, 1, left) <= 0) return false;
        ssize_t r = read(fd, p, n);
        if (r <= 0) return false;
        p += r;
        n -= (size_t)r;
    }
    return true;
}
static bool write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void child_main(int rank, int world, int up, int down, scenario_fn fn) {
    sy_dataplane_t *dp = NULL;
    char mine[EP_LEN] = {0};
    if (sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &dp) != SY_OK) {
        fprintf(stderr, "rank %d: dataplane: %s\n", rank, sy_err_msg());
        _exit(90);
    }
    snprintf(mine, sizeof mine, "%s", sy_dataplane_endpoint(dp));
    if (!write_full(up, mine, EP_LEN)) _exit(91);
    static char all[MAX_W][EP_LEN];
    const char *eps[MAX_W];
    if (!read_full(down, all, (size_t)world * EP_LEN, 10000)) _exit(92);
    for (int r = 0; r < world; r++) eps[r] = all[r];
    int code = fn(rank, world, dp, eps);
    sy_dataplane_destroy(&dp);
    _exit(code);
}

/* Forks `world` children running fn; victims (bit mask) are ranks expected to die or stop: the
 * parent waits for the others, then SIGKILLs the victims. codes[r]: exit code, 128+signal, or
 * 99 when the child missed the deadline. */
static void run_world(int world, scenario_fn fn, unsigned victims, int *codes) {
    pid_t pid[MAX_W];
    int up[MAX_W][2], down[MAX_W][2];
    assert_true(world >= 1 && world <= MAX_W);
    fflush(NULL);
    for (int r = 0; r < world; r++) {
        assert_int_equal(pipe(up[r]), 0);
        assert_int_equal(pipe(down[r]), 0);
        pid[r] = fork();
        assert_true(pid[r] >= 0);
        if (pid[r] == 0) {
            close(up[r][0]);
            close(down[r][1]);
            child_main(r, world, up[r][1], down[r][0], fn);
        }
        close(up[r][1]);
        close(down[r][0]);
    }
    static char all[MAX_W][EP_LEN];
    for (int r = 0; r < world; r++) assert_true(read_full(up[r][0], all[r], EP_LEN, 10000));
    for (int r = 0; r < world; r++) {
        assert_true(write_full(down[r][1], all, (size_t)world * EP_LEN));
        close(down[r][1]);
        close(up[r][0]);
    }
    int64_t end = now_ms() + CHILD_DEADLINE_MS;
    bool done[MAX_W] = {0};
    for (;;) {
        bool pending = false;
        for (int r = 0; r < world; r++) {
            if (done[r]) continue;
            int ws;
            pid_t w = waitpid(pid[r], &ws, WNOHANG);
            if (w == pid[r]) {
                done[r] = true;
                codes[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
            } else if (!(victims & (1u << r))) {
                pending = true;
            }
        }
        if (!pending) break;
        if (now_ms() > end) {
            for (int r = 0; r < world; r++)
                if (!done[r]) fprintf(stderr, "rank %d missed the %d ms deadline\n", r, CHILD_DEADLINE_MS);
            break;
        }
        usleep(5000);
    }
    for (int r = 0; r < world; r++) {
        if (done[r]) continue;
        kill(pid[r], SIGKILL);
        int ws;
        waitpid(pid[r], &ws, 0);
        codes[r] = (victims & (1u << r)) ? 0 : 99;
    }
}

static void expect_all_ok(int world, scenario_fn fn, unsigned victims) {
    int codes[MAX_W];
    run_world(world, fn, victims, codes);
    for (int r = 0; r < world; r++) {
        if (victims & (1u << r)) continue;
        if (codes[r] != 0) fprintf(stderr, "rank %d exited with %d\n", r, codes[r]);
        assert_int_equal(codes[r], 0);
    }
}

/* Child-side check: report and fail the child (no cmocka in children). */
#define CK(cond, ...)                                                                  \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", rank, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                              \
            fprintf(stderr, " [%s]\n", sy_err_msg());                                  \
            return 1;                                                                  \
        }                                                                              \
    } while (0)

/* ---------------------------------------------------------------- generators */


/* alltoallv chunk size from src to dst in iteration it: uneven, a third of them empty. */
static size_t a2a_size(int src, int dst, int it, size_t maxb) {
    uint64_t h = h3((uint64_t)src, (uint64_t)dst * 7919 + 1, (uint64_t)it);
    return h % 3 == 0 ? 0 : (size_t)(h >> 8) % maxb;
}
static uint8_t a2a_byte(int src, int dst, int it, size_t i) {
    uint64_t seed = h3((uint64_t)src, (uint64_t)dst, (uint64_t)it);
    return (uint8_t)(mix(seed + i / 8) >> ((i % 8) * 8));
}

/* Runs one alltoallv where rank r sends size(r, d) bytes to d, and checks every received byte. */
static int do_a2a(sy_comm_t *c, int rank, int world, int it, size_t (*size)(int, int, int, size_t), size_t maxb) {
    size_t sb[MAX_W] = {0}, rb[MAX_W] = {0}, stot = 0, rtot = 0;
    for (int d = 0; d < world; d++) stot += sb[d] = size(rank, d, it, maxb);
    for (int s = 0; s < world; s++) rtot += rb[s] = size(s, rank, it, maxb);
    uint8_t *send = calloc(stot + 1, 1), *recv = malloc(rtot + 1);
    CK(send && recv, "alloc");
    size_t o = 0;
    for (int d = 0; d < world; d++)
        for (size_t i = 0; i < sb[d]; i++) send[o++] = a2a_byte(rank, d, it, i);
    sy_status st = sy_comm_alltoallv(c, send, sb, recv, rb);
    CK(st == SY_OK, "alltoallv it %d: %s", it, sy_strerror(st));
    o = 0;
    for (int s = 0; s < world; s++) {
        size_t want = size(s, rank, it, maxb);
        CK(rb[s] == want, "it %d: recv_bytes[%d] = %zu, want %zu", it, s, rb[s], want);
        for (size_t i = 0; i < want; i++)
            CK(recv[o + i] == a2a_byte(s, rank, it, i), "it %d: byte %zu from rank %d", it, i, s);
        o += want;
    }
    free(send);
    free(recv);
    return 0;
}

/* Input of rank r for all-reduce: magnitudes spread over 12 decades so the order of the sum
 * matters (a different order gives different bits). */
static double ar_value(int r, size_t i, int it) {
    uint64_t h = h3((uint64_t)r + 11, i, (uint64_t)it);
    double m = (double)(int64_t)(h % 2000001) - 1000000.0;
    int e = (int)((h >> 24) % 13) - 6;
    return m * pow(10.0, e);
}

static int do_ar_f32(sy_comm_t *c, int rank, int world, size_t n, int it, bool check_order_matters) {
    float *buf = malloc((n + 1) * sizeof *buf);
    CK(buf, "alloc");
    for (size_t i = 0; i < n; i++) buf[i] = (float)ar_value(rank, i, it);
    sy_status st = sy_comm_allreduce_f32(c, buf, n);
    CK(st == SY_OK, "allreduce_f32 n=%zu: %s", n, sy_strerror(st));
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) {
        float s = (float)ar_value(0, i, it);
        for (int r = 1; r < world; r++) s += (float)ar_value(r, i, it);
        float rev = (float)ar_value(world - 1, i, it);
        for (int r = world - 2; r >= 0; r--) rev += (float)ar_value(r, i, it);
        differ += memcmp(&s, &rev, sizeof s) != 0;
        CK(memcmp(&s, &buf[i], sizeof s) == 0, "f32 n=%zu elem %zu: got %.9g want %.9g", n, i, buf[i], s);
    }
    /* the test can tell orders apart */
    if (check_order_matters && world >= 3 && n >= 1000) CK(differ > 0, "no element depends on the order");
    free(buf);
    return 0;
}

static int do_ar_f64(sy_comm_t *c, int rank, int world, size_t n, int it) {
    double *buf = malloc((n + 1) * sizeof *buf);
    CK(buf, "alloc");
    for (size_t i = 0; i < n; i++) buf[i] = ar_value(rank, i, it);
    sy_status st = sy_comm_allreduce_f64(c, buf, n);
    CK(st == SY_OK, "allreduce_f64 n=%zu: %s", n, sy_strerror(st));
    for (size_t i = 0; i < n; i++) {
        double s = ar_value(0, i, it);
        for (int r = 1; r < world; r++) s += ar_value(r, i, it);
        CK(memcmp(&s, &buf[i], sizeof s) == 0, "f64 n=%zu elem %zu: got %.17g want %.17g", n, i, buf[i], s);
    }
    free(buf);
    return 0;
}

static int do_bcast(sy_comm_t *c, int rank, size_t bytes, int root, int it) {
    uint8_t *buf = malloc(bytes + 1);
    CK(buf, "alloc");
    for (size_t i = 0; i < bytes; i++) buf[i] = rank == root ? a2a_byte(root, 99, it, i) : 0x5a;
    sy_status st = sy_comm_broadcast(c, buf, bytes, root);
    CK(st == SY_OK, "broadcast %zu bytes from %d: %s", bytes, root, sy_strerror(st));
    for (size_t i = 0; i < bytes; i++) CK(buf[i] == a2a_byte(root, 99, it, i), "broadcast byte %zu", i);
    free(buf);
    return 0;
}

#define RUN(expr)                 \
    do {                          \
        int rc_ = (expr);         \
        if (rc_) return rc_;      \
    } while (0)

/* ---------------------------------------------------------------- scenarios */

/* 1.5 MiB-ish chunks so some streams span two messages. */
static size_t big_uneven(int s, int d, int it, size_t maxb) {
    (void)maxb;
    if (it != 1) return a2a_size(s, d, it, 5000);
    return (s + d) % 3 == 0 ? 0 : (size_t)1500000 + (size_t)(s * 1000 + d * 17);
}

static int sc_basic(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 7, rank, world, eps, 5000, &c) == SY_OK, "comm_new");
    CK(sy_comm_rank(c) == rank && sy_comm_world(c) == world, "rank/world");
    RUN(do_a2a(c, rank, world, 0, a2a_size, 5000));
    RUN(do_a2a(c, rank, world, 1, big_uneven, 0));
    /* all chunks empty */
    {
        size_t sb[MAX_W] = {0}, rb[MAX_W] = {0};
        CK(sy_comm_alltoallv(c, NULL, sb, NULL, rb) == SY_OK, "empty alltoallv");
    }
    size_t ns[] = {0, 1, 3, 1000, 1000003};
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        RUN(do_ar_f32(c, rank, world, ns[k], (int)k, true));
        RUN(do_ar_f64(c, rank, world, ns[k], (int)k));
    }
    RUN(do_bcast(c, rank, 0, world - 1, 0));
    RUN(do_bcast(c, rank, 17, world - 1, 1));
    RUN(do_bcast(c, rank, 3 << 20, world - 1, 2));
    for (int i = 0; i < 3; i++) CK(sy_comm_barrier(c) == SY_OK, "barrier %d", i);
    sy_comm_stats s = sy_comm_get_stats(c);
    CK(s.collectives == 3 + 2 * 5 + 3 + 3, "collectives %llu", (unsigned long long)s.collectives);
    if (world > 1) CK(s.bytes_sent > 0 && s.bytes_received > 0, "byte counters");
    sy_comm_destroy(&c);
    sy_comm_destroy(&c); /* safe twice */
    CK(c == NULL, "destroy nulls");
    if (world == 1) { /* world 1 needs no data plane */
        CK(sy_comm_new(NULL, 1, 0, 1, NULL, 100, &c) == SY_OK, "world-1 comm without dp");
        RUN(do_ar_f64(c, rank, 1, 100, 3));
        RUN(do_a2a(c, rank, 1, 5, a2a_size, 100));
        CK(sy_comm_broadcast(c, NULL, 0, 0) == SY_OK && sy_comm_barrier(c) == SY_OK, "world-1 bcast/barrier");
        CK(sy_comm_broadcast(c, NULL, 0, 1) == SY_EINVAL, "root out of range");
        sy_comm_destroy(&c);
    }
    return 0;
}

static void test_basic_w1(void **s) { (void)s; expect_all_ok(1, sc_basic, 0); }
static void test_basic_w2(void **s) { (void)s; expect_all_ok(2, sc_basic, 0); }
static void test_basic_w3(void **s) { (void)s; expect_all_ok(3, sc_basic, 0); }
static void test_basic_w4(void **s) { (void)s; expect_all_ok(4, sc_basic, 0); }

/* 100 collectives back to back, no barriers: a fast rank's next round must be stashed. */
static size_t seq_size(int s, int d, int it, size_t maxb) {
    if (it == 50) return d == (s + 1) % 4 || (d == 0 && s == 1) ? (size_t)11 << 20 : (size_t)(s + d); /* > 10 MB */
    return a2a_size(s, d, it, maxb);
}

static int sc_sequence(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 3, rank, world, eps, 5000, &c) == SY_OK, "comm_new");
    for (int it = 0; it < 100; it++) {
        switch (it % 4) {
        case 0: RUN(do_a2a(c, rank, world, it, seq_size, 1 + (size_t)(it * 997) % 40000)); break;
        case 1:
            if (it == 51) RUN(do_ar_f32(c, rank, world, (size_t)3 << 20, it, false)); /* 12 MB */
            else RUN(do_ar_f64(c, rank, world, (size_t)(mix((uint64_t)it) % 5000), it));
            break;
        case 2: RUN(do_bcast(c, rank, (size_t)(mix((uint64_t)it) % 20000), it % world, it)); break;
        default: CK(sy_comm_barrier(c) == SY_OK, "barrier it %d", it);
        }
    }
    CK(sy_comm_get_stats(c).collectives == 100, "100 collectives");
    sy_comm_destroy(&c);
    return 0;
}

static void test_sequence_w2(void **s) { (void)s; expect_all_ok(2, sc_sequence, 0); }
static void test_sequence_w4(void **s) { (void)s; expect_all_ok(4, sc_sequence, 0); }

/* Dead peers: rank 2 of 3 dies in three ways; ranks 0 and 1 must get SY_ETIMEOUT within
 * timeout + margin, naming rank 2. */
#define DEAD_TIMEOUT_MS 500
#define DEAD_BOUND_MS 1500

static int expect_timeout(int rank, sy_status st, int64_t t0, const char *op) {
    int64_t el = now_ms() - t0;
    CK(st == SY_ETIMEOUT, "%s with a dead peer gave %s", op, sy_strerror(st));
    CK(el >= DEAD_TIMEOUT_MS - 50 && el < DEAD_BOUND_MS, "%s returned after %lld ms", op, (long long)el);
    CK(strstr(sy_err_msg(), "rank(s) 2 ") != NULL, "message names rank 2");
    CK(strstr(sy_err_msg(), op) != NULL, "message names the collective %s", op);
    return 0;
}

static int sc_dead_exit(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    if (rank == 2) return 0; /* exits before any collective */
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, DEAD_TIMEOUT_MS, &c) == SY_OK, "comm_new");
    usleep(100000);
    size_t sb[3] = {1000, 1000, 1000}, rb[3] = {1000, 1000, 1000};
    static char send[3000], recv[3000];
    int64_t t0 = now_ms();
    sy_status st = sy_comm_alltoallv(c, send, sb, recv, rb);
    RUN(expect_timeout(rank, st, t0, "alltoallv"));
    /* failed: the next call fails at once */
    t0 = now_ms();
    CK(sy_comm_barrier(c) == SY_ETIMEOUT && now_ms() - t0 < 50, "failed comm answers at once");
    sy_comm_destroy(&c);
    return 0;
}

static int sc_dead_kill(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, DEAD_TIMEOUT_MS * 4, &c) == SY_OK, "comm_new");
    RUN(do_a2a(c, rank, world, 0, a2a_size, 3000));
    CK(sy_comm_barrier(c) == SY_OK, "barrier");
    if (rank == 2) {
        usleep(200000); /* as a crash would, after the I/O thread flushed the barrier */
        raise(SIGKILL);
    }
    sy_comm_destroy(&c);
    CK(sy_comm_new(dp, 2, rank, world, eps, DEAD_TIMEOUT_MS, &c) == SY_OK, "comm_new");
    usleep(50000);
    static float buf[100000];
    int64_t t0 = now_ms();
    sy_status st = sy_comm_allreduce_f32(c, buf, 100000);
    RUN(expect_timeout(rank, st, t0, "allreduce"));
    sy_comm_destroy(&c);
    return 0;
}

/* The stopped peer still accepts TCP data into its kernel buffers until they fill: 8 MiB per
 * peer keeps our zero-copy sends queued in zmq, so the failure path must release them. */
static int sc_dead_stop(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, DEAD_TIMEOUT_MS * 4, &c) == SY_OK, "comm_new");
    CK(sy_comm_barrier(c) == SY_OK, "barrier");
    if (rank == 2) {
        usleep(200000); /* let the I/O thread flush the barrier messages: then stop for good */
        raise(SIGSTOP);
        return 0;
    }
    sy_comm_destroy(&c);
    CK(sy_comm_new(dp, 2, rank, world, eps, DEAD_TIMEOUT_MS, &c) == SY_OK, "comm_new");
    usleep(50000);
    size_t big = (size_t)8 << 20;
    size_t sb[3] = {big, big, big}, rb[3] = {big, big, big};
    char *send = malloc(3 * big), *recv = malloc(3 * big);
    CK(send && recv, "alloc");
    memset(send, rank + 1, 3 * big);
    int64_t t0 = now_ms();
    sy_status st = sy_comm_alltoallv(c, send, sb, recv, rb);
    RUN(expect_timeout(rank, st, t0, "alltoallv"));
    sy_comm_destroy(&c);
    /* zmq released our buffer: scribbling over it and freeing it must be safe now */
    memset(send, 0, 3 * big);
    free(send);
    free(recv);
    return 0;
}

static void test_dead_exit(void **s) { (void)s; expect_all_ok(3, sc_dead_exit, 1u << 2); }
static void test_dead_sigkill(void **s) { (void)s; expect_all_ok(3, sc_dead_kill, 1u << 2); }
static void test_dead_sigstop(void **s) { (void)s; expect_all_ok(3, sc_dead_stop, 1u << 2); }

/* Abort from another thread: a barrier that rank 1 never joins returns SY_EABORTED promptly. */
typedef struct {
    sy_comm_t *c;
    int64_t t_abort;
} abort_arg;

static void *abort_later(void *p) {
    abort_arg *a = p;
    usleep(150000);
    a->t_abort = now_ms();
    sy_comm_abort(a->c);
    sy_comm_abort(a->c); /* idempotent */
    return NULL;
}

static int sc_abort(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, 10000, &c) == SY_OK, "comm_new");
    if (rank == 1) {
        usleep(600000); /* never joins */
        sy_comm_destroy(&c);
        return 0;
    }
    abort_arg a = {.c = c};
    pthread_t th;
    CK(pthread_create(&th, NULL, abort_later, &a) == 0, "thread");
    sy_status st = sy_comm_barrier(c);
    int64_t t1 = now_ms();
    pthread_join(th, NULL);
    CK(st == SY_EABORTED, "barrier gave %s", sy_strerror(st));
    CK(t1 - a.t_abort < 200, "returned %lld ms after abort", (long long)(t1 - a.t_abort));
    CK(sy_comm_barrier(c) == SY_EABORTED, "later calls are aborted too");
    sy_comm_destroy(&c);
    /* abort before the call */
    CK(sy_comm_new(dp, 2, rank, world, eps, 10000, &c) == SY_OK, "comm_new 2");
    sy_comm_abort(c);
    int64_t t0 = now_ms();
    float x = 1;
    CK(sy_comm_allreduce_f32(c, &x, 1) == SY_EABORTED && now_ms() - t0 < 50, "abort before the call");
    sy_comm_destroy(&c);
    return 0;
}

static void test_abort(void **s) { (void)s; expect_all_ok(2, sc_abort, 0); }

/* Stale generation: ranks 1 and 2 move to generation 2 while rank 0, still in generation 1,
 * sends a full alltoallv of garbage whose round numbers collide with generation 2's. Generation 2
 * results must be exact and ranks 1, 2 must have dropped rank 0's stale messages. Ranks 1 and 2
 * start generation 2 before rank 0 opens it, so rank 0 must also keep their early messages. */
static size_t stale_size(int s, int d, int it, size_t maxb) {
    (void)maxb;
    return 200000 + (size_t)(h3((uint64_t)s, (uint64_t)d, (uint64_t)it) % 1000); /* zero-copy sized */
}

static int sc_stale(int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, 5000, &c) == SY_OK, "comm_new g1");
    RUN(do_a2a(c, rank, world, 100, stale_size, 0));
    RUN(do_ar_f64(c, rank, world, 999, 100));
    /* gen 1 used rounds 1..3; gen 2 will use rounds 1..8 */
    if (rank == 0) {
        usleep(200000); /* the others are in generation 2 by now */
        size_t sb[MAX_W], rb[MAX_W], tot = 0;
        for (int d = 0; d < world; d++) tot += sb[d] = rb[d] = stale_size(0, d, 3, 0);
        char *junk = malloc(tot), *recv = malloc(tot * MAX_W);
        memset(junk, 0xee, tot);
        sy_comm_destroy(&c);
        CK(sy_comm_new(dp, 1, rank, world, eps, 300, &c) == SY_OK, "comm_new g1 again");
        /* rounds 1..3 of generation 1 again, the peers never answer: times out */
        for (int k = 0; k < 4; k++) {
            sy_status st = sy_comm_alltoallv(c, junk, sb, recv, rb);
            if (st != SY_OK) {
                CK(st == SY_ETIMEOUT, "stale alltoallv gave %s", sy_strerror(st));
                break;
            }
        }
        free(junk);
        free(recv);
    }
    sy_comm_destroy(&c);
    CK(sy_comm_new(dp, 2, rank, world, eps, 5000, &c) == SY_OK, "comm_new g2");
    for (int it = 0; it < 8; it++) RUN(do_a2a(c, rank, world, it, stale_size, 0));
    if (rank != 0)
        CK(sy_dataplane_dropped(dp) >= 1, "stale messages dropped: %llu", (unsigned long long)sy_dataplane_dropped(dp));
    CK(sy_comm_barrier(c) == SY_OK, "final barrier");
    sy_comm_destroy(&c);
    return 0;
}

static void test_stale_generation(void **s) { (void)s; expect_all_ok(3, sc_stale, 0); }

/* Bad arguments fail cleanly, in-process. */
static void test_bad_args(void **s) {
    (void)s;
    sy_dataplane_t *dp = NULL;
    assert_int_equal(sy_dataplane_new("tcp", "tcp://nonsense:xyz", &dp), SY_EIO);
    assert_null(dp);
    assert_int_equal(sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &dp), SY_OK);
    assert_non_null(strstr(sy_dataplane_endpoint(dp), "tcp://127.0.0.1:"));
    const char *eps[2] = {sy_dataplane_endpoint(dp), "tcp://127.0.0.1:1"};
    sy_comm_t *c = NULL;
    assert_int_equal(sy_comm_new(dp, 1, 2, 2, eps, 100, &c), SY_EINVAL);
    assert_int_equal(sy_comm_new(dp, 1, 0, 2, eps, 0, &c), SY_EINVAL);
    assert_int_equal(sy_comm_new(NULL, 1, 0, 2, eps, 100, &c), SY_EINVAL);
    const char *bad[2] = {eps[0], "no-transport"};
    assert_int_equal(sy_comm_new(dp, 1, 0, 2, bad, 100, &c), SY_EINVAL);
    assert_int_equal(sy_comm_new(dp, 1, 0, 2, eps, 100, &c), SY_OK);
    sy_comm_t *c2 = NULL;
    assert_int_equal(sy_comm_new(dp, 2, 0, 2, eps, 100, &c2), SY_EINVAL); /* one at a time */
    assert_int_equal(sy_comm_broadcast(c, NULL, 10, 0), SY_EINVAL);
    assert_int_equal(sy_comm_broadcast(c, NULL, 0, 5), SY_EINVAL);
    /* nobody at rank 1: the barrier times out naming it */
    int64_t t0 = now_ms();
    assert_int_equal(sy_comm_barrier(c), SY_ETIMEOUT);
    assert_true(now_ms() - t0 < 600);
    assert_non_null(strstr(sy_err_msg(), "rank(s) 1 "));
    sy_comm_destroy(&c);
    sy_dataplane_destroy(&dp);
    sy_dataplane_destroy(&dp);
    assert_null(dp);
}

/* The threads of this process whose name starts with prefix ("<serial>/ZMQbg": one data plane's):
 * how many; how many of them run in the idle class; and, with a set, how many may run on exactly
 * those CPUs (*on). */
static int threads_named(const char *prefix, int *idle, const cpu_set_t *set, int *on) {
    int n = 0;
    *idle = 0;
    if (on) *on = 0;
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", de->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
        fclose(f);
        if (strncmp(comm, prefix, strlen(prefix))) continue;
        n++;
        const pid_t tid = atoi(de->d_name);
        *idle += sched_getscheduler(tid) == SCHED_IDLE;
        if (set) {
            cpu_set_t got;
            assert_int_equal(sched_getaffinity(tid, sizeof got, &got), 0);
            *on += CPU_EQUAL(&got, set);
        }
    }
    closedir(d);
    return n;
}
static int zmq_threads(const char *prefix, int *idle) { return threads_named(prefix, idle, NULL, NULL); }

/* Two tcp data planes, once the four ZeroMQ threads they start (I/O and reaper each) have named
 * themselves, which each does once it runs. */
static void two_data_planes(sy_dataplane_t **a, sy_dataplane_t **b) {
    assert_int_equal(sy_dataplane_new("tcp", "tcp://127.0.0.1:*", a), SY_OK);
    assert_int_equal(sy_dataplane_new("tcp", "tcp://127.0.0.1:*", b), SY_OK);
    for (int k = 0, idle; k < 200; k++) {
        int named = 0;
        for (int serial = 1; serial <= 1000; serial++) {
            char p[32];
            snprintf(p, sizeof p, "%d/ZMQbg", serial);
            named += zmq_threads(p, &idle);
        }
        if (named >= 4) break;
        usleep(5000);
    }
}

/* sy_dataplane_set_background moves exactly that data plane's ZeroMQ threads (its I/O thread,
 * where sealing and socket work happen, and its reaper) to the idle class and back; another data
 * plane's threads and the caller's stay in the normal class. */
static void test_background_threads(void **state) {
    (void)state;
    if (!sy_bg_available()) {
        printf("skipped: this process may not leave the idle scheduling class (no CAP_SYS_NICE, ulimit -e < 20)\n");
        skip();
    }
    sy_dataplane_t *a = NULL, *b = NULL;
    two_data_planes(&a, &b);
    /* which serial is a's: the threads that went idle */
    assert_int_equal(sy_dataplane_set_background(a, 1), SY_OK);
    char pa[32] = "";
    int found = 0;
    for (int serial = 1; serial <= 1000 && !found; serial++) {
        char p[32];
        snprintf(p, sizeof p, "%d/ZMQbg", serial);
        int idle, n = zmq_threads(p, &idle);
        if (n > 0 && idle > 0) {
            assert_int_equal(idle, n); /* all of a's threads */
            assert_true(n >= 2);       /* I/O thread and reaper */
            snprintf(pa, sizeof pa, "%s", p);
            found = 1;
        }
    }
    assert_true(found);
    int idle_now;
    /* nothing else went idle: b's threads, the caller */
    int idle_total = 0;
    DIR *d = opendir("/proc/self/task");
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.') idle_total += sched_getscheduler(atoi(de->d_name)) == SCHED_IDLE;
    closedir(d);
    int n_a = zmq_threads(pa, &idle_now);
    assert_int_equal(idle_total, n_a);
    assert_int_equal(sched_getscheduler(0), SCHED_OTHER);
    /* and back */
    assert_int_equal(sy_dataplane_set_background(a, 0), SY_OK);
    assert_int_equal(zmq_threads(pa, &idle_now), n_a);
    assert_int_equal(idle_now, 0);
    /* the kind without threads of its own: nothing to do */
    sy_dataplane_t *t = NULL;
    assert_int_equal(sy_dataplane_new("threads", NULL, &t), SY_OK);
    assert_int_equal(sy_dataplane_set_background(t, 1), SY_OK);
    sy_dataplane_destroy(&t);
    sy_dataplane_destroy(&a);
    sy_dataplane_destroy(&b);
}

/* sy_dataplane_pin (cluster.replica_cpus) restricts exactly that data plane's ZeroMQ threads to
 * the CPUs given; another data plane's threads and the caller keep theirs; a CPU the process
 * cannot use is an error that names the CPUs. */
static void test_pin_threads(void **state) {
    (void)state;
    cpu_set_t all, one;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    if (CPU_COUNT(&all) < 2) {
        printf("skipped: this process may run on one CPU only: pinning would change nothing to see\n");
        skip();
    }
    CPU_ZERO(&one);
    for (int c = CPU_SETSIZE - 1; c >= 0; c--)
        if (CPU_ISSET(c, &all)) {
            CPU_SET(c, &one); /* the last CPU this process may use */
            break;
        }
    sy_dataplane_t *a = NULL, *b = NULL;
    two_data_planes(&a, &b);
    assert_int_equal(sy_dataplane_pin(a, &one), SY_OK);
    int pinned = 0, others = 0, others_all = 0;
    for (int serial = 1; serial <= 1000; serial++) {
        char p[32];
        snprintf(p, sizeof p, "%d/ZMQbg", serial);
        int idle, on_one, on_all, n = threads_named(p, &idle, &one, &on_one);
        (void)threads_named(p, &idle, &all, &on_all);
        if (n == 0) continue;
        if (on_one) {
            assert_int_equal(on_one, n); /* all of a's threads: I/O thread and reaper */
            assert_true(n >= 2);
            pinned++;
        } else {
            others += n;
            others_all += on_all;
        }
    }
    assert_int_equal(pinned, 1);        /* one data plane's threads */
    assert_true(others >= 2);            /* b's */
    assert_int_equal(others_all, others); /* untouched */
    cpu_set_t mine;
    assert_int_equal(sched_getaffinity(0, sizeof mine, &mine), 0);
    assert_true(CPU_EQUAL(&mine, &all));
    /* no CPU the process may use: an error naming them */
    cpu_set_t none;
    CPU_ZERO(&none);
    CPU_SET(CPU_SETSIZE - 1, &none);
    if (!CPU_ISSET(CPU_SETSIZE - 1, &all)) {
        assert_int_equal(sy_dataplane_pin(b, &none), SY_EIO);
        assert_non_null(strstr(sy_err_msg(), "CPUs 1023"));
    }
    /* the kind without threads of its own: nothing to do */
    sy_dataplane_t *t = NULL;
    assert_int_equal(sy_dataplane_new("threads", NULL, &t), SY_OK);
    assert_int_equal(sy_dataplane_pin(t, &one), SY_OK);
    sy_dataplane_destroy(&t);
    sy_dataplane_destroy(&a);
    sy_dataplane_destroy(&b);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_args),      cmocka_unit_test(test_basic_w1),
        cmocka_unit_test(test_basic_w2),      cmocka_unit_test(test_basic_w3),
        cmocka_unit_test(test_basic_w4),      cmocka_unit_test(test_sequence_w2),
        cmocka_unit_test(test_sequence_w4),   cmocka_unit_test(test_dead_exit),
        cmocka_unit_test(test_dead_sigkill),  cmocka_unit_test(test_dead_sigstop),
        cmocka_unit_test(test_abort),         cmocka_unit_test(test_stale_generation),
        cmocka_unit_test(test_background_threads), cmocka_unit_test(test_pin_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
