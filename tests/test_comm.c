/* The data plane behind its ops table (src/comm/comm.h): every implementation that runs on the
 * CPU ("tcp", "threads") with its ranks as threads of this process, through the same scenarios:
 *   - alltoallv with uneven and empty chunks (sizes known in advance), all-reduce f32/f64
 *     bit-identical to the rank-order sum s = x_0 + x_1 + ... (the inputs make the order
 *     visible), broadcast from a non-zero root, barrier, byte counters;
 *   - abort from another thread while rank 0 is blocked in a collective its peer never joins:
 *     SY_EABORTED within 500 ms of the abort (the contract is SY_COMM_ABORT_MS = 50 ms; the
 *     bound is generous for a loaded CI machine; the measured latency is printed), in a barrier
 *     and in an alltoallv; later collectives fail at once;
 *   - a peer sending another size than the receiver expects: SY_EFORMAT naming that rank;
 *   - a peer that never comes: SY_ETIMEOUT naming it;
 *   - an unknown implementation name: SY_EINVAL.
 * (tests/test_comm.c runs tcp between processes: dead peers, stale generations, big payloads.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm/comm.h"
#include "sy_test.h"

#define MAX_W 4
#define EP_LEN 256
#define ABORT_BOUND_MS 500

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- harness */

typedef int (*scenario_fn)(const char *kind, int rank, int world, sy_dataplane_t *dp, const char *const *eps);

typedef struct {
    const char *kind;
    int world;
    scenario_fn fn;
    pthread_barrier_t ready, done;
    char eps[MAX_W][EP_LEN];
    int code[MAX_W];
} world_t;

typedef struct {
    world_t *w;
    int rank;
} rank_arg;

static void *rank_main(void *p) {
    rank_arg *a = p;
    world_t *w = a->w;
    sy_dataplane_t *dp = NULL;
    if (sy_dataplane_new(w->kind, "tcp://127.0.0.1:*", &dp) != SY_OK) {
        fprintf(stderr, "%s rank %d: data plane: %s\n", w->kind, a->rank, sy_err_msg());
        w->code[a->rank] = 90;
    } else {
        snprintf(w->eps[a->rank], EP_LEN, "%s", sy_dataplane_endpoint(dp));
    }
    pthread_barrier_wait(&w->ready);
    const char *eps[MAX_W];
    for (int r = 0; r < w->world; r++) eps[r] = w->eps[r];
    if (dp) w->code[a->rank] = w->fn(w->kind, a->rank, w->world, dp, eps);
    pthread_barrier_wait(&w->done); /* nobody's mailbox goes away while a peer still sends */
    sy_dataplane_destroy(&dp);
    return NULL;
}

static void run_world(const char *kind, int world, scenario_fn fn) {
    static world_t w;
    memset(&w, 0, sizeof w);
    w.kind = kind, w.world = world, w.fn = fn;
    pthread_barrier_init(&w.ready, NULL, (unsigned)world);
    pthread_barrier_init(&w.done, NULL, (unsigned)world);
    pthread_t th[MAX_W];
    rank_arg args[MAX_W];
    for (int r = 0; r < world; r++) {
        args[r] = (rank_arg){&w, r};
        assert_int_equal(pthread_create(&th[r], NULL, rank_main, &args[r]), 0);
    }
    for (int r = 0; r < world; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&w.ready);
    pthread_barrier_destroy(&w.done);
    for (int r = 0; r < world; r++) {
        if (w.code[r]) fprintf(stderr, "%s world %d: rank %d failed with %d\n", kind, world, r, w.code[r]);
        assert_int_equal(w.code[r], 0);
    }
}

#define CK(cond, ...)                                                                                   \
    do {                                                                                                \
        if (!(cond)) {                                                                                  \
            fprintf(stderr, "%s rank %d: %s:%d: check failed: %s: ", kind, rank, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                               \
            fprintf(stderr, " [%s]\n", sy_err_msg());                                                   \
            return 1;                                                                                   \
        }                                                                                               \
    } while (0)

/* ---------------------------------------------------------------- generators */


static size_t a2a_size(int src, int dst, int it) {
    uint64_t h = h3((uint64_t)src, (uint64_t)dst * 7919 + 1, (uint64_t)it);
    return h % 3 == 0 ? 0 : (size_t)(h >> 8) % 3000;
}
static uint8_t a2a_byte(int src, int dst, int it, size_t i) {
    return (uint8_t)(mix(h3((uint64_t)src, (uint64_t)dst, (uint64_t)it) + i / 8) >> ((i % 8) * 8));
}

/* Magnitudes over 12 decades: the order of the sum changes the bits. */
static double ar_value(int r, size_t i) {
    uint64_t h = h3((uint64_t)r + 11, i, 5);
    double m = (double)(int64_t)(h % 2000001) - 1000000.0;
    return m * pow(10.0, (int)((h >> 24) % 13) - 6);
}

/* ---------------------------------------------------------------- scenarios */

static int sc_basic(const char *kind, int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 4, rank, world, eps, 5000, &c) == SY_OK, "comm_new");
    for (int it = 0; it < 5; it++) {
        size_t sb[MAX_W], rb[MAX_W], st = 0, rt = 0;
        for (int r = 0; r < world; r++) st += sb[r] = a2a_size(rank, r, it), rt += rb[r] = a2a_size(r, rank, it);
        uint8_t *send = malloc(st + 1), *recv = malloc(rt + 1);
        CK(send && recv, "alloc");
        size_t o = 0;
        for (int d = 0; d < world; d++)
            for (size_t i = 0; i < sb[d]; i++) send[o++] = a2a_byte(rank, d, it, i);
        CK(sy_comm_alltoallv(c, send, sb, recv, rb) == SY_OK, "alltoallv it %d", it);
        o = 0;
        for (int s = 0; s < world; s++)
            for (size_t i = 0; i < rb[s]; i++, o++) CK(recv[o] == a2a_byte(s, rank, it, i), "byte %zu from %d", i, s);
        free(send);
        free(recv);
    }
    enum { N = 10007 };
    static _Thread_local float f[N];
    static _Thread_local double d[N];
    for (size_t i = 0; i < N; i++) f[i] = (float)ar_value(rank, i), d[i] = ar_value(rank, i);
    CK(sy_comm_allreduce_f32(c, f, N) == SY_OK, "allreduce f32");
    CK(sy_comm_allreduce_f64(c, d, N) == SY_OK, "allreduce f64");
    size_t order_visible = 0;
    for (size_t i = 0; i < N; i++) {
        float sf = (float)ar_value(0, i), rf = (float)ar_value(world - 1, i);
        double sd = ar_value(0, i);
        for (int r = 1; r < world; r++) sf += (float)ar_value(r, i), sd += ar_value(r, i);
        for (int r = world - 2; r >= 0; r--) rf += (float)ar_value(r, i);
        order_visible += memcmp(&sf, &rf, sizeof sf) != 0;
        CK(memcmp(&sf, &f[i], sizeof sf) == 0, "f32 elem %zu: %.9g, want %.9g", i, f[i], sf);
        CK(memcmp(&sd, &d[i], sizeof sd) == 0, "f64 elem %zu", i);
    }
    if (world >= 3) CK(order_visible > 0, "no element depends on the order");
    char buf[777];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = rank == world - 1 ? (char)a2a_byte(9, 9, 9, i) : 0;
    CK(sy_comm_broadcast(c, buf, sizeof buf, world - 1) == SY_OK, "broadcast");
    for (size_t i = 0; i < sizeof buf; i++) CK(buf[i] == (char)a2a_byte(9, 9, 9, i), "broadcast byte %zu", i);
    CK(sy_comm_barrier(c) == SY_OK, "barrier");
    sy_comm_stats s = sy_comm_get_stats(c);
    CK(s.collectives == 5 + 2 + 2, "collectives %llu", (unsigned long long)s.collectives);
    if (world > 1) CK(s.bytes_sent > 0 && s.bytes_received > 0, "byte counters");
    sy_comm_destroy(&c);
    return 0;
}

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

/* Rank 0 blocks in a collective that rank 1 never joins; a third thread aborts it. */
static int sc_abort(const char *kind, int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    for (int which = 0; which < 2; which++) {
        sy_comm_t *c = NULL;
        CK(sy_comm_new(dp, 1 + (uint64_t)which, rank, world, eps, 10000, &c) == SY_OK, "comm_new");
        if (rank == 0) {
            abort_arg a = {.c = c};
            pthread_t th;
            CK(pthread_create(&th, NULL, abort_later, &a) == 0, "thread");
            size_t sb[2] = {64, 64}, rb[2] = {64, 64};
            char send[128] = {0}, recv[128];
            sy_status st = which == 0 ? sy_comm_barrier(c) : sy_comm_alltoallv(c, send, sb, recv, rb);
            int64_t t1 = now_ms();
            pthread_join(th, NULL);
            const char *what = which == 0 ? "barrier" : "alltoallv";
            CK(st == SY_EABORTED, "%s gave %s", what, sy_strerror(st));
            printf("%s: %s returned SY_EABORTED %lld ms after sy_comm_abort\n", kind, what,
                   (long long)(t1 - a.t_abort));
            CK(t1 - a.t_abort < ABORT_BOUND_MS, "%s returned %lld ms after abort", what, (long long)(t1 - a.t_abort));
            int64_t t2 = now_ms();
            CK(sy_comm_barrier(c) == SY_EABORTED && now_ms() - t2 < 50, "later calls abort at once");
        }
        /* rank 1 never joins: it only keeps its data plane open until rank 0 is done */
        sy_comm_destroy(&c);
        usleep(rank == 1 ? 400000 : 0);
    }
    return 0;
}

/* Rank 1 expects 101 bytes from rank 0, which sends 100. */
static int sc_mismatch(const char *kind, int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, 1000, &c) == SY_OK, "comm_new");
    size_t sb[2] = {100, 100}, rb[2] = {100, 100};
    if (rank == 1) rb[0] = 101;
    char send[200] = {0}, recv[201];
    sy_status st = sy_comm_alltoallv(c, send, sb, recv, rb);
    if (rank == 1) {
        CK(st == SY_EFORMAT, "mismatch gave %s", sy_strerror(st));
        CK(strstr(sy_err_msg(), "rank 0 sends 100 bytes, rank 1 expects 101") != NULL, "message names both");
    } else {
        /* tcp: rank 1 may drop its queued data when it fails, then rank 0 times out */
        CK(st == SY_OK || st == SY_ETIMEOUT, "rank 0 gave %s", sy_strerror(st));
    }
    sy_comm_destroy(&c);
    return 0;
}

/* Rank 1 opens no communicator: rank 0 times out naming it. */
static int sc_absent(const char *kind, int rank, int world, sy_dataplane_t *dp, const char *const *eps) {
    if (rank == 1) return 0;
    sy_comm_t *c = NULL;
    CK(sy_comm_new(dp, 1, rank, world, eps, 300, &c) == SY_OK, "comm_new");
    int64_t t0 = now_ms();
    float x = 1;
    CK(sy_comm_allreduce_f32(c, &x, 1) == SY_ETIMEOUT, "allreduce without rank 1");
    CK(now_ms() - t0 < 1500, "timed out after %lld ms", (long long)(now_ms() - t0));
    CK(strstr(sy_err_msg(), "rank(s) 1 ") != NULL, "names rank 1");
    sy_comm_destroy(&c);
    return 0;
}

static const char *const KINDS[] = {"tcp", "threads"};

static void test_basic(void **s) {
    (void)s;
    for (int k = 0; k < 2; k++)
        for (int w = 1; w <= MAX_W; w++) run_world(KINDS[k], w, sc_basic);
}
static void test_abort(void **s) {
    (void)s;
    for (int k = 0; k < 2; k++) run_world(KINDS[k], 2, sc_abort);
}
static void test_mismatch(void **s) {
    (void)s;
    for (int k = 0; k < 2; k++) run_world(KINDS[k], 2, sc_mismatch);
}
static void test_absent(void **s) {
    (void)s;
    for (int k = 0; k < 2; k++) run_world(KINDS[k], 2, sc_absent);
}
static void test_unknown_kind(void **s) {
    (void)s;
    sy_dataplane_t *dp = NULL;
    assert_int_equal(sy_dataplane_new("carrier-pigeon", NULL, &dp), SY_EINVAL);
    assert_null(dp);
    assert_non_null(strstr(sy_err_msg(), "tcp, threads"));
    assert_int_equal(sy_dataplane_new("threads", NULL, &dp), SY_OK);
    assert_string_equal(sy_dataplane_kind(dp), "threads");
    const char *eps[2] = {sy_dataplane_endpoint(dp), "tcp://127.0.0.1:1"};
    sy_comm_t *c = NULL;
    assert_int_equal(sy_comm_new(dp, 1, 0, 2, eps, 100, &c), SY_EINVAL); /* not a threads endpoint */
    sy_dataplane_destroy(&dp);
    sy_dataplane_destroy(&dp);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unknown_kind), cmocka_unit_test(test_basic),  cmocka_unit_test(test_abort),
        cmocka_unit_test(test_mismatch),     cmocka_unit_test(test_absent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
