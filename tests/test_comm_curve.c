/* The tcp data plane with and without CurveZMQ (comm.h sy_dataplane_new_curve,
 * sy_comm_new_curve; docs/security.md "Data plane"), against a stranger that injects well-formed
 * data-plane messages (the 32-byte header of comm_tcp.c) from a raw ZeroMQ PUSH socket.
 *
 * Two ranks run in two threads of this process, each with its own data plane (own zmq context,
 * own ZAP handler). The all-reduce result is checked against the ordered sum computed here.
 *   curve_stranger: a stranger with its own key pair is refused at the handshake (counted by
 *     sy_dataplane_refused once the hold time passes); the results are exact.
 *   curve_shared_keys: both ranks with one key pair (what `switchyard run` may do): works.
 *   curve_impersonation: distinct keys; a holder of rank 1's key that sends rows claiming rank 0
 *     gets through the handshake, but its rows are dropped (sy_dataplane_dropped): exact results.
 *   plain_forgery: without CURVE, a forged well-formed row of the current round IS taken as rank
 *     0's data: the result is wrong (the risk cluster.insecure accepts); malformed frames are
 *     dropped and counted, and the next results are exact.
 *   api: the argument checks; a generation of one admits only its own member's key. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "comm/comm.h"
#include "sy_test.h"

#define N 1000       /* floats per all-reduce; rank 1's block is N/2 */
#define GEN 5
#define TIMEOUT_MS 1500

typedef struct { /* comm_tcp.c's header */
    uint32_t magic;
    uint8_t version, op;
    uint16_t src;
    uint32_t chunk, seq;
    uint64_t gen, total;
} hdr;

typedef struct {
    sy_comm_t *c;
    int rank, rounds;
    float got[N];
    sy_status st;
} rank_job;

static float value(int rank, int round, int i) { return (float)((rank + 1) * 0.25 + round * 0.5 + i * 1e-3); }

static void *rank_main(void *arg) {
    rank_job *j = arg;
    j->st = SY_OK;
    for (int k = 0; k < j->rounds && j->st == SY_OK; k++) {
        for (int i = 0; i < N; i++) j->got[i] = value(j->rank, k, i);
        j->st = sy_comm_allreduce_f32(j->c, j->got, N);
    }
    return NULL;
}

/* Runs `rounds` all-reduces on both ranks; true when every rank got x_0 + x_1 of the last round. */
static bool run_exact(sy_comm_t *c0, sy_comm_t *c1, int rounds, sy_status *st0, sy_status *st1) {
    static rank_job j[2];
    j[0] = (rank_job){.c = c0, .rank = 0, .rounds = rounds};
    j[1] = (rank_job){.c = c1, .rank = 1, .rounds = rounds};
    pthread_t th[2];
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, rank_main, &j[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    *st0 = j[0].st, *st1 = j[1].st;
    bool exact = j[0].st == SY_OK && j[1].st == SY_OK;
    for (int r = 0; r < 2 && exact; r++)
        for (int i = 0; i < N && exact; i++) {
            float want = value(0, rounds - 1, i);
            want += value(1, rounds - 1, i);
            exact = j[r].got[i] == want;
        }
    return exact;
}

/* A raw PUSH socket that sends `n` reduce-scatter rows claiming rank 0, rounds 1..n of GEN, with
 * the size rank 1 expects. With server_key: a CURVE client with (pub, sec). */
typedef struct {
    void *ctx, *s;
} stranger;

static stranger stranger_send(const char *ep, const char *server_key, const char *pub, const char *sec, int n,
                              bool malformed) {
    stranger x;
    x.ctx = zmq_ctx_new();
    x.s = zmq_socket(x.ctx, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(x.s, ZMQ_LINGER, &zero, sizeof zero);
    if (server_key) {
        zmq_setsockopt(x.s, ZMQ_CURVE_SERVERKEY, server_key, 41);
        zmq_setsockopt(x.s, ZMQ_CURVE_PUBLICKEY, pub, 41);
        zmq_setsockopt(x.s, ZMQ_CURVE_SECRETKEY, sec, 41);
    }
    assert_int_equal(zmq_connect(x.s, ep), 0);
    static unsigned char payload[(N / 2) * sizeof(float)];
    memset(payload, 0x7f, sizeof payload);
    for (int q = 1; q <= n; q++) {
        hdr h = {.magic = 0x50445953u, .version = 1, .op = 2, .src = 0, .chunk = 0, .seq = (uint32_t)q,
                 .gen = GEN, .total = sizeof payload};
        if (malformed) h.magic = 0xdeadbeefu;
        zmq_send(x.s, &h, sizeof h, ZMQ_SNDMORE);
        zmq_send(x.s, payload, sizeof payload, 0);
        if (malformed) zmq_send(x.s, "junk", 4, 0); /* a one-frame message */
    }
    return x;
}

static void stranger_close(stranger *x) {
    zmq_close(x->s);
    zmq_ctx_term(x->ctx);
}

typedef struct {
    sy_dataplane_t *dp[2];
    sy_comm_t *c[2];
} pair;

static void pair_open(pair *p, const char (*pub)[41], const char (*sec)[41]) {
    const char *eps[2], *keys[2];
    for (int r = 0; r < 2; r++) {
        if (pub) assert_int_equal(sy_dataplane_new_curve("tcp", "tcp://127.0.0.1:*", pub[r], sec[r], &p->dp[r]), SY_OK);
        else assert_int_equal(sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &p->dp[r]), SY_OK);
        eps[r] = sy_dataplane_endpoint(p->dp[r]);
        keys[r] = pub ? pub[r] : NULL;
    }
    for (int r = 0; r < 2; r++) {
        if (pub) assert_int_equal(sy_comm_new_curve(p->dp[r], GEN, r, 2, eps, keys, TIMEOUT_MS, &p->c[r]), SY_OK);
        else assert_int_equal(sy_comm_new(p->dp[r], GEN, r, 2, eps, TIMEOUT_MS, &p->c[r]), SY_OK);
    }
}

static void pair_close(pair *p) {
    for (int r = 0; r < 2; r++) {
        sy_comm_destroy(&p->c[r]);
        sy_dataplane_destroy(&p->dp[r]);
    }
}

static void keypairs(char (*pub)[41], char (*sec)[41], int n) {
    for (int i = 0; i < n; i++) assert_int_equal(zmq_curve_keypair(pub[i], sec[i]), 0);
}

static void test_curve_stranger(void **state) {
    (void)state;
    char pub[3][41], sec[3][41];
    keypairs(pub, sec, 3); /* 0, 1: the ranks; 2: the stranger */
    pair p;
    pair_open(&p, (const char(*)[41])pub, (const char(*)[41])sec);
    assert_true(sy_dataplane_is_curve(p.dp[1]));
    stranger x = stranger_send(sy_dataplane_endpoint(p.dp[1]), pub[1], pub[2], sec[2], 5, false);
    usleep(200 * 1000); /* the forged rows would be first in line, were they admitted */
    sy_status s0, s1;
    assert_true(run_exact(p.c[0], p.c[1], 5, &s0, &s1));
    /* the stranger's handshake is held for the hold time (the comm's timeout), then refused */
    for (int i = 0; i < (TIMEOUT_MS + 3000) / 50 && sy_dataplane_refused(p.dp[1]) == 0; i++) usleep(50 * 1000);
    assert_int_equal(sy_dataplane_refused(p.dp[1]), 1);
    assert_int_equal(sy_dataplane_refused(p.dp[0]), 0);
    assert_true(run_exact(p.c[0], p.c[1], 3, &s0, &s1));
    stranger_close(&x);
    pair_close(&p);
}

static void test_curve_shared_keys(void **state) {
    (void)state;
    char pub[1][41], sec[1][41];
    keypairs(pub, sec, 1);
    const char both_pub[2][41] = {0}, both_sec[2][41] = {0};
    memcpy((char *)both_pub[0], pub[0], 41), memcpy((char *)both_pub[1], pub[0], 41);
    memcpy((char *)both_sec[0], sec[0], 41), memcpy((char *)both_sec[1], sec[0], 41);
    pair p;
    pair_open(&p, both_pub, both_sec);
    sy_status s0, s1;
    assert_true(run_exact(p.c[0], p.c[1], 10, &s0, &s1));
    assert_int_equal(sy_dataplane_refused(p.dp[0]) + sy_dataplane_refused(p.dp[1]), 0);
    pair_close(&p);
}

static void test_curve_impersonation(void **state) {
    (void)state;
    char pub[2][41], sec[2][41];
    keypairs(pub, sec, 2);
    pair p;
    pair_open(&p, (const char(*)[41])pub, (const char(*)[41])sec);
    uint64_t before = sy_dataplane_dropped(p.dp[1]);
    /* rank 1's own key pair, used by someone else, claiming to be rank 0 */
    stranger x = stranger_send(sy_dataplane_endpoint(p.dp[1]), pub[1], pub[1], sec[1], 3, false);
    usleep(200 * 1000);
    sy_status s0, s1;
    assert_true(run_exact(p.c[0], p.c[1], 5, &s0, &s1));
    assert_true(sy_dataplane_dropped(p.dp[1]) - before >= 3);
    assert_int_equal(sy_dataplane_refused(p.dp[1]), 0); /* a member's key passes the handshake */
    stranger_close(&x);
    pair_close(&p);
}

static void test_plain_forgery(void **state) {
    (void)state;
    pair p;
    stranger x;
    sy_status s0, s1;
    /* the forged row is taken as rank 0's block (a wrong sum) when it is queued before the real
     * one; were the real row first, the forgery would be dropped. Nothing tells a forgery from
     * data: shown once the forgery arrived first (the wait doubles per attempt, for a loaded
     * machine where 200 ms may not see it delivered) */
    bool exact = true;
    for (int attempt = 0; attempt < 5 && exact; attempt++) {
        pair_open(&p, NULL, NULL);
        x = stranger_send(sy_dataplane_endpoint(p.dp[1]), NULL, NULL, NULL, 1, false);
        usleep((useconds_t)(200 * 1000) << attempt);
        exact = run_exact(p.c[0], p.c[1], 1, &s0, &s1);
        stranger_close(&x);
        pair_close(&p);
    }
    assert_false(exact);

    pair_open(&p, NULL, NULL);
    uint64_t before = sy_dataplane_dropped(p.dp[1]);
    x = stranger_send(sy_dataplane_endpoint(p.dp[1]), NULL, NULL, NULL, 4, true);
    usleep(200 * 1000);
    assert_true(run_exact(p.c[0], p.c[1], 3, &s0, &s1));
    assert_true(sy_dataplane_dropped(p.dp[1]) - before >= 8); /* 4 bad-magic rows + 4 one-frame messages */
    stranger_close(&x);
    pair_close(&p);
}

static void test_api(void **state) {
    (void)state;
    char pub[2][41], sec[2][41];
    keypairs(pub, sec, 2);
    sy_dataplane_t *dp = NULL, *plain = NULL;
    sy_comm_t *c = NULL;
    assert_int_equal(sy_dataplane_new_curve("tcp", "tcp://127.0.0.1:*", "short", sec[0], &dp), SY_EINVAL);
    assert_null(dp);
    assert_int_equal(sy_dataplane_new_curve("threads", NULL, pub[0], sec[0], &dp), SY_EINVAL);
    assert_int_equal(sy_dataplane_new_curve("tcp", "tcp://127.0.0.1:*", pub[0], sec[0], &dp), SY_OK);
    assert_int_equal(sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &plain), SY_OK);
    assert_false(sy_dataplane_is_curve(plain));
    const char *eps[2] = {sy_dataplane_endpoint(dp), sy_dataplane_endpoint(plain)};
    const char *keys[2] = {pub[0], pub[1]}, *bad[2] = {pub[0], "not-a-key"};
    assert_int_equal(sy_comm_new(dp, 1, 0, 2, eps, 100, &c), SY_EINVAL);             /* keys needed */
    assert_int_equal(sy_comm_new_curve(plain, 1, 1, 2, eps, keys, 100, &c), SY_EINVAL); /* no CURVE */
    assert_int_equal(sy_comm_new_curve(dp, 1, 0, 2, eps, bad, 100, &c), SY_EINVAL);
    assert_int_equal(sy_comm_new_curve(dp, 1, 0, 2, eps, keys, 100, &c), SY_OK);
    sy_comm_destroy(&c);
    /* a generation of one: rank 1's key of the previous generation is no longer admitted (held
     * for the hold time, 100 ms here, then refused) */
    assert_int_equal(sy_comm_new_curve(dp, 2, 0, 1, eps, keys, 100, &c), SY_OK);
    stranger x = stranger_send(sy_dataplane_endpoint(dp), pub[0], pub[1], sec[1], 1, false);
    for (int i = 0; i < 60 && sy_dataplane_refused(dp) == 0; i++) usleep(50 * 1000);
    assert_int_equal(sy_dataplane_refused(dp), 1);
    stranger_close(&x);
    sy_comm_destroy(&c);
    sy_dataplane_destroy(&dp);
    sy_dataplane_destroy(&plain);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_api),          cmocka_unit_test(test_curve_shared_keys),
        cmocka_unit_test(test_curve_stranger), cmocka_unit_test(test_curve_impersonation),
        cmocka_unit_test(test_plain_forgery),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
