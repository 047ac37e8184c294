/* sy_commabort KIND MS [REPS]: the abort latency of a communicator whose peer never joins
 * (issue 11 item 2; tests/gpu/device_check.sh runs it with nccl on a GPU).
 *
 * Each repetition opens a KIND data plane ("nccl" or "tcp"), a communicator as rank 0 of 2 whose
 * rank 1 is an endpoint nobody serves (a data plane opened and closed at once), with a 60 s
 * timeout, and runs a barrier on it. A second thread calls sy_comm_abort after MS ms. For nccl
 * the barrier is the generation's first collective: it makes the unique id, hands it over tcp
 * and sits in the non-blocking ncclCommInitRankConfig waiting for rank 1, which is where the
 * abort lands. Prints one line per repetition ("abort latency nccl: 3.2 ms (aborted)") and the
 * maximum; exits 0 when every barrier returned SY_EABORTED within SY_COMM_ABORT_MS of the abort,
 * 1 otherwise, 77 when KIND cannot run here (nccl without a GPU), 2 on bad arguments. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/status.h"
#include "comm/comm.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

typedef struct {
    sy_comm_t *c;
    int delay_ms;
    double t_abort;
} aborter;

static void *abort_main(void *arg) {
    aborter *a = arg;
    usleep((useconds_t)a->delay_ms * 1000);
    a->t_abort = now_ms();
    sy_comm_abort(a->c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "nccl") && strcmp(argv[1], "tcp")) || atoi(argv[2]) < 0) {
        fprintf(stderr, "usage: sy_commabort nccl|tcp MS [REPS]\n");
        return 2;
    }
    const char *kind = argv[1];
    const int ms = atoi(argv[2]), reps = argc > 3 ? atoi(argv[3]) : 3;
    if (!strcmp(kind, "nccl")) {
        char why[1024];
        if (sy_comm_nccl_available(why, sizeof why) <= 0) {
            fprintf(stderr, "sy_commabort: skipped: nccl cannot run here: %s\n", why);
            return 77;
        }
        printf("nccl: %s\n", why);
    }
    /* rank 1's endpoint: a port that was just free, so nobody serves it */
    char dead[256];
    sy_dataplane_t *tmp = NULL;
    if (sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &tmp) != SY_OK) {
        fprintf(stderr, "sy_commabort: %s\n", sy_err_msg());
        return 1;
    }
    snprintf(dead, sizeof dead, "%s", sy_dataplane_endpoint(tmp));
    sy_dataplane_destroy(&tmp);
    double worst = 0;
    int bad = 0;
    for (int i = 0; i < reps; i++) {
        sy_dataplane_t *dp = NULL;
        sy_comm_t *c = NULL;
        if (sy_dataplane_new(kind, "tcp://127.0.0.1:*", &dp) != SY_OK) {
            fprintf(stderr, "sy_commabort: data plane %s: %s\n", kind, sy_err_msg());
            return 1;
        }
        const char *eps[2] = {sy_dataplane_endpoint(dp), dead};
        if (sy_comm_new(dp, (uint64_t)i + 1, 0, 2, eps, 60000, &c) != SY_OK) {
            fprintf(stderr, "sy_commabort: communicator: %s\n", sy_err_msg());
            return 1;
        }
        aborter a = {c, ms, 0};
        pthread_t th;
        pthread_create(&th, NULL, abort_main, &a);
        sy_status st = sy_comm_barrier(c);
        double t_ret = now_ms();
        pthread_join(th, NULL);
        double lat = t_ret - a.t_abort;
        printf("abort latency %s: %.1f ms (%s: %s)\n", kind, lat, sy_strerror(st), sy_err_msg());
        if (st != SY_EABORTED || lat > SY_COMM_ABORT_MS) bad++;
        if (lat > worst) worst = lat;
        double t0 = now_ms();
        sy_comm_destroy(&c); /* nccl: ncclCommAbort of a communicator torn down already */
        sy_dataplane_destroy(&dp);
        printf("close %s: %.1f ms\n", kind, now_ms() - t0);
    }
    printf("abort latency %s: max %.1f ms over %d (limit %d ms): %s\n", kind, worst, reps, SY_COMM_ABORT_MS,
           bad ? "FAIL" : "ok");
    return bad ? 1 : 0;
}
