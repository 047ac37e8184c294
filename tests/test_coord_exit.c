/* The coordinator exits however its workers leave (src/coordinator/coord.c sy_coord_destroy).
 *
 * The coordinator watches its ROUTER socket with a libzmq socket monitor: libzmq's I/O thread
 * sends every event (here: a connection closed) into an inproc PAIR with a blocking send while
 * it holds the socket's monitor lock, and stopping the monitor takes that lock. When nobody
 * reads the PAIR (the reactor has ended) and enough workers disconnect at once (all of them do,
 * after their Stop), a pipe with a high-water mark fills, the I/O thread blocks in that send,
 * and sy_coord_destroy waits on the lock forever: a coordinator that never exits. CI saw one
 * still running 30 s after POST /v1/stop (py_test_status_history).
 *
 * test_exit_after_mass_disconnect: 3,000 connections to a coordinator whose reactor has
 * stopped are closed at once (6,000 event messages, three times libzmq's default pipe limit of
 * 1,000 + 1,000); sy_coord_destroy must return within 30 s. It hangs on the code before the
 * fix (the monitor PAIR with its default RCVHWM). Skipped where the process may not open the
 * 6,000+ descriptors it needs (RLIMIT_NOFILE's hard limit). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "base/config.h"
#include "coordinator/coord.h"
#include "sy_test.h"

#define N_CONN 3000
#define DESTROY_WAIT_S 30

typedef struct {
    sy_coord_t *c;
    volatile sig_atomic_t stop;
    sy_coord_outcome outcome;
    sy_status st;
    volatile int done;
} run_arg;

static void *run_main(void *p) {
    run_arg *r = p;
    r->st = sy_coord_run(r->c, &r->stop, &r->outcome);
    r->done = 1;
    return NULL;
}

static void *destroy_main(void *p) {
    run_arg *r = p;
    sy_coord_destroy(&r->c);
    r->done = 1;
    return NULL;
}

/* Waits for r->done at most `s` seconds; 1 when it came. */
static int wait_done(run_arg *r, int s) {
    for (int i = 0; i < s * 100 && !r->done; i++) usleep(10000);
    return r->done;
}

static void test_exit_after_mass_disconnect(void **state) {
    (void)state;
    struct rlimit rl;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
    const rlim_t need = 2 * N_CONN + 512;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
        print_message("RLIMIT_NOFILE hard limit %llu < %llu: skipped\n", (unsigned long long)rl.rlim_max,
                      (unsigned long long)need);
        skip();
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur < need) {
        rl.rlim_cur = need;
        assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
    }

    sy_config_t cfg;
    assert_int_equal(sy_config_defaults(&cfg), SY_OK);
    char set[512];
    const char *sets[] = {"run.name=exitrun", "run.state_dir=%s/state", "checkpoint.store=%s/store",
                          "cluster.max_workers=4", "cluster.heartbeat_ms=100"};
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) {
        snprintf(set, sizeof set, sets[i], tmpdir);
        assert_int_equal(sy_config_set(&cfg, set), SY_OK);
    }
    sy_coord_opts opts = {.bind = "tcp://127.0.0.1:0", .status_addr = "127.0.0.1:0"};
    run_arg r = {0};
    assert_int_equal(sy_coord_new(&cfg, &opts, &r.c), SY_OK);
    char ep[256];
    snprintf(ep, sizeof ep, "%s", sy_coord_endpoint(r.c));
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, run_main, &r), 0);

    /* N_CONN connections, accepted while the reactor runs */
    void *ctx = zmq_ctx_new();
    assert_non_null(ctx);
    assert_int_equal(zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, N_CONN + 16), 0);
    void **s = calloc(N_CONN, sizeof *s);
    assert_non_null(s);
    int zero = 0;
    for (int i = 0; i < N_CONN; i++) {
        s[i] = zmq_socket(ctx, ZMQ_DEALER);
        assert_non_null(s[i]);
        zmq_setsockopt(s[i], ZMQ_LINGER, &zero, sizeof zero);
        assert_int_equal(zmq_connect(s[i], ep), 0);
    }
    sleep(3); /* the TCP connections and ZMTP greetings of 3,000 sockets */

    /* the reactor ends (as after POST /v1/stop); nobody reads the monitor any more */
    r.stop = 1;
    assert_true(wait_done(&r, 10));
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(r.st, SY_OK);
    assert_int_equal(r.outcome, SY_COORD_STOPPED);

    /* every worker leaves at once, then the coordinator is destroyed */
    for (int i = 0; i < N_CONN; i++) zmq_close(s[i]);
    free(s);
    sleep(2); /* the disconnects reach the coordinator's I/O thread */
    r.done = 0;
    assert_int_equal(pthread_create(&th, NULL, destroy_main, &r), 0);
    if (!wait_done(&r, DESTROY_WAIT_S))
        fail_msg("sy_coord_destroy still running %d s after %d connections closed at once: the I/O thread is "
                 "blocked in a monitor event send (a coordinator that never exits)",
                 DESTROY_WAIT_S, N_CONN);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_null(r.c);
    zmq_ctx_term(ctx);
    sy_config_free(&cfg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_exit_after_mass_disconnect, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
