/* Expert parallelism (src/model/switch_ep.c) between real processes equals the single-process
 * Switch layer: outputs, input gradients, router gradients and every expert's weight gradients,
 * with tokens dropped by capacity, for W = 2, 3, 4 and E = 8 (so W = 3 is an uneven placement),
 * including a round where some ranks have no micro-batch and only serve their experts, and a
 * scattered (non-contiguous) placement such as a recovery leaves. In bf16 mode (the backend's
 * bf16 flag) the rows cross the wire as bf16 and the results still match to 1e-6: the wire
 * conversion must be exact for the bf16-rounded activations (a lossy one errs by ~1e-3).
 * A backend without a host view (host_view NULL, as a device backend) stages the exchange
 * through host buffers and gets the same results. Inputs, weights and results live in backend
 * buffers (uploaded and downloaded as device memory), so the file passes with
 * SY_BACKEND_POISON=1 too.
 *
 * Every child builds the same inputs from a fixed seed, computes the reference on its own (all
 * experts local, every micro-batch of the round), then runs its micro-batch through the
 * exchange and compares. The parent checks exit codes with a deadline. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "comm/comm.h"
#include "proto/placement.h"
#include "base/rng.h"
#include "model/switch.h"
#include "model/switch_ep.h"

enum { D = 12, F = 20, E = 8, G = 24, EP_LEN = 256, MAXW = 4 };
#define CF 1.0 /* capacity 4 per expert (G/E = 3 → max(4, 3)): drops happen */

static void fill(float *x, size_t n, uint64_t seed, const char *tag, float scale) {
    sy_rng_t r = sy_rng_key(seed, tag, 0, 0, 0);
    for (size_t i = 0; i < n; i++) x[i] = scale * (float)sy_rng_normal(&r);
}

typedef struct {
    float Wr[E * D], dWr[E * D];
    float W1[E][F * D], W2[E][D * F], dW1[E][F * D], dW2[E][D * F];
} weights; /* host */

static void weights_init(weights *w) {
    memset(w, 0, sizeof *w);
    fill(w->Wr, E * D, 7, "Wr", 0.8f); /* skewed enough that some experts overflow */
    for (int e = 0; e < E; e++) {
        char t[16];
        snprintf(t, sizeof t, "W1.%d", e);
        fill(w->W1[e], F * D, 7, t, 0.3f);
        snprintf(t, sizeof t, "W2.%d", e);
        fill(w->W2[e], D * F, 7, t, 0.3f);
    }
}

/* Backend copies of a weights set (the test treats backend memory as device memory: it uploads
 * the host inputs and downloads the gradients to compare them). */
typedef struct {
    float *Wr, *dWr, *W1[E], *W2[E], *dW1[E], *dW2[E];
    sy_expert_weights ex[E];
} dev_weights;

static float *upload_new(sy_backend_t *be, const float *host, size_t n) {
    float *p = be->alloc(be, n * sizeof(float));
    if (p && host) be->upload(be, p, host, n * sizeof(float));
    return p;
}

/* 0, or -1 when an allocation failed. Gradients start at 0 (alloc() zeroes). */
static int dev_weights_new(sy_backend_t *be, const weights *w, dev_weights *d) {
    memset(d, 0, sizeof *d);
    d->Wr = upload_new(be, w->Wr, E * D);
    d->dWr = upload_new(be, NULL, E * D);
    int ok = d->Wr && d->dWr;
    for (int e = 0; e < E; e++) {
        d->W1[e] = upload_new(be, w->W1[e], F * D);
        d->W2[e] = upload_new(be, w->W2[e], D * F);
        d->dW1[e] = upload_new(be, NULL, F * D);
        d->dW2[e] = upload_new(be, NULL, D * F);
        ok = ok && d->W1[e] && d->W2[e] && d->dW1[e] && d->dW2[e];
        d->ex[e] = (sy_expert_weights){d->W1[e], d->W2[e], d->dW1[e], d->dW2[e], NULL, NULL};
    }
    return ok ? 0 : -1;
}

/* The gradients, backend -> w. */
static void dev_weights_download(sy_backend_t *be, weights *w, const dev_weights *d) {
    be->download(be, w->dWr, d->dWr, sizeof w->dWr);
    for (int e = 0; e < E; e++) {
        be->download(be, w->dW1[e], d->dW1[e], sizeof w->dW1[e]);
        be->download(be, w->dW2[e], d->dW2[e], sizeof w->dW2[e]);
    }
}

static void dev_weights_free(sy_backend_t *be, dev_weights *d) {
    be->free(be, d->Wr), be->free(be, d->dWr);
    for (int e = 0; e < E; e++) {
        be->free(be, d->W1[e]), be->free(be, d->W2[e]);
        be->free(be, d->dW1[e]), be->free(be, d->dW2[e]);
    }
}

static double rel(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Child: micro-batches 0..M-1 of one round (M ≤ world: ranks ≥ M are idle). Returns 0 if every
 * comparison holds. */
static int g_scattered; /* placement: 0 balanced contiguous ranges, 1 round-robin (e % W) */
static bool g_bf16;     /* backend in bf16 mode: bf16 rows on the wire */
static bool g_staged;   /* backend without a host view: the exchange stages through host buffers */

/* host_view of a device backend: backend memory is not host-accessible */
static void *no_host_view(sy_backend_t *be, void *p) {
    (void)be, (void)p;
    return NULL;
}

static int child(int rank, int world, int M, sy_dataplane_t *dp, char eps[][EP_LEN]) {
    sy_backend_t *be = NULL;
    sy_backend_cpu_new(1, g_bf16, &be);
    if (g_staged) be->host_view = no_host_view;
    static weights ref, dist;
    weights_init(&ref);
    weights_init(&dist);
    static dev_weights dref, ddist;
    if (dev_weights_new(be, &ref, &dref) || dev_weights_new(be, &dist, &ddist)) return 16;
    float out_ref[MAXW][G * D], dh_ref[MAXW][G * D], hbuf[G * D];
    float *h[MAXW], *dout[MAXW], *bout = upload_new(be, NULL, G * D), *bdh = upload_new(be, NULL, G * D);
    if (!bout || !bdh) return 16;
    for (int m = 0; m < M; m++) {
        fill(hbuf, G * D, 100 + m, "h", 1.0f);
        h[m] = upload_new(be, hbuf, G * D);
        fill(hbuf, G * D, 200 + m, "dout", 1.0f);
        dout[m] = upload_new(be, hbuf, G * D);
        if (!h[m] || !dout[m]) return 16;
        be->round_bf16(be, h[m], G * D); /* activations are bf16 in bf16 mode */
        be->round_bf16(be, dout[m], G * D);
    }
    const float aux_scale = 0.01f * E / (G * M), z_scale = 0.001f * 2 / (G * M);
    int dropped = 0;
    /* reference: every micro-batch locally, expert grads accumulated over all of them */
    for (int m = 0; m < M; m++) {
        sy_switch_t *sw = NULL;
        sy_switch_new(be, G, D, F, E, &sw);
        sy_switch_key key = {1, 0, m, 0};
        sy_switch_route(sw, h[m], dref.Wr, CF, 0.0, key);
        dropped += G - sy_switch_get_info(sw).n_kept;
        sy_switch_dispatch(sw, h[m]);
        sy_switch_experts(sw, dref.ex, 0, E, 0.0, key);
        sy_switch_combine(sw, bout);
        sy_switch_combine_bwd(sw, dout[m]);
        sy_switch_experts_bwd(sw, dref.ex, 0, E);
        sy_switch_dispatch_bwd(sw, bdh);
        sy_switch_route_bwd(sw, h[m], dref.Wr, dref.dWr, bdh, aux_scale, z_scale);
        be->download(be, out_ref[m], bout, sizeof out_ref[m]);
        be->download(be, dh_ref[m], bdh, sizeof dh_ref[m]);
        sy_switch_destroy(&sw);
    }
    dev_weights_download(be, &ref, &dref);
    if (dropped == 0) {
        fprintf(stderr, "rank %d: no token dropped: the test would not test drops\n", rank);
        return 10;
    }
    /* expert parallel */
    const char *ep_list[MAXW];
    for (int r = 0; r < world; r++) ep_list[r] = eps[r];
    sy_comm_t *comm = NULL;
    if (sy_comm_new(dp, 1, rank, world, ep_list, 5000, &comm) != SY_OK) {
        fprintf(stderr, "rank %d: comm: %s\n", rank, sy_err_msg());
        return 11;
    }
    uint32_t owner[E];
    sy_placement_balanced(E, world, owner);
    if (g_scattered)
        for (int e = 0; e < E; e++) owner[e] = (uint32_t)(e % world); /* after a recovery */
    sy_ep_t *ep = NULL;
    if (sy_ep_new(be, comm, owner, E, D, F, G, 1, &ep) != SY_OK) {
        fprintf(stderr, "rank %d: ep: %s\n", rank, sy_err_msg());
        return 12;
    }
    bool active = rank < M;
    sy_switch_t *sw = NULL;
    sy_switch_new(be, G, D, F, E, &sw);
    float out[G * D], dh[G * D];
    sy_switch_key key = {1, 0, rank, 0}, round_key = {1, 0, 0, 0};
    if (active) {
        sy_switch_route(sw, h[rank], ddist.Wr, CF, 0.0, key);
        sy_switch_dispatch(sw, h[rank]);
    }
    if (sy_ep_forward(ep, active ? sw : NULL, 0, ddist.ex, 0.0, round_key) != SY_OK) {
        fprintf(stderr, "rank %d: ep forward: %s\n", rank, sy_err_msg());
        return 13;
    }
    if (active) {
        sy_switch_combine(sw, bout);
        be->download(be, out, bout, sizeof out);
        sy_switch_combine_bwd(sw, dout[rank]);
    }
    if (sy_ep_backward(ep, active ? sw : NULL, 0, ddist.ex) != SY_OK) {
        fprintf(stderr, "rank %d: ep backward: %s\n", rank, sy_err_msg());
        return 14;
    }
    int bad = 0;
    if (active) {
        sy_switch_dispatch_bwd(sw, bdh);
        sy_switch_route_bwd(sw, h[rank], ddist.Wr, ddist.dWr, bdh, aux_scale, z_scale);
        be->download(be, dh, bdh, sizeof dh);
        double eo = rel(out, out_ref[rank], G * D), ed = rel(dh, dh_ref[rank], G * D);
        if (eo > 1e-6 || ed > 1e-6) {
            fprintf(stderr, "rank %d: output rel err %.3g, input grad rel err %.3g\n", rank, eo, ed);
            bad = 20;
        }
    }
    dev_weights_download(be, &dist, &ddist);
    /* router gradient: sum over ranks must equal the reference */
    if (sy_comm_allreduce_f32(comm, dist.dWr, E * D) != SY_OK) return 15;
    double er = rel(dist.dWr, ref.dWr, E * D);
    if (er > 1e-5) {
        fprintf(stderr, "rank %d: router grad rel err %.3g\n", rank, er);
        bad = 21;
    }
    /* owned experts: gradients over every rank's tokens; others untouched (0) */
    for (int e = 0; e < E; e++) {
        if (owner[e] == (uint32_t)rank) {
            double e1 = rel(dist.dW1[e], ref.dW1[e], F * D), e2 = rel(dist.dW2[e], ref.dW2[e], D * F);
            if (e1 > 1e-5 || e2 > 1e-5) {
                fprintf(stderr, "rank %d: expert %d grad rel err %.3g %.3g\n", rank, e, e1, e2);
                bad = 22;
            }
        } else {
            for (int i = 0; i < F * D; i++)
                if (dist.dW1[e][i] != 0.0f || dist.dW2[e][i] != 0.0f) {
                    fprintf(stderr, "rank %d: computed a gradient for expert %d it does not own\n", rank, e);
                    bad = 23;
                    break;
                }
        }
    }
    sy_switch_destroy(&sw);
    sy_ep_destroy(&ep);
    for (int m = 0; m < M; m++) be->free(be, h[m]), be->free(be, dout[m]);
    be->free(be, bout), be->free(be, bdh);
    dev_weights_free(be, &dref), dev_weights_free(be, &ddist);
    sy_comm_destroy(&comm);
    sy_backend_destroy(&be);
    return bad;
}

/* Forks `world` children, exchanges their endpoints, waits for all (20 s deadline). */
static void run_world(int world, int M) {
    int up[MAXW][2], down[MAXW][2];
    pid_t pid[MAXW];
    for (int r = 0; r < world; r++) {
        assert_int_equal(pipe(up[r]), 0);
        assert_int_equal(pipe(down[r]), 0);
        pid[r] = fork();
        assert_true(pid[r] >= 0);
        if (pid[r] == 0) {
            sy_dataplane_t *dp = NULL;
            if (sy_dataplane_new("tcp", "tcp://127.0.0.1:*", &dp) != SY_OK) _exit(90);
            char eps[MAXW][EP_LEN];
            memset(eps, 0, sizeof eps);
            snprintf(eps[r], EP_LEN, "%s", sy_dataplane_endpoint(dp));
            if (write(up[r][1], eps[r], EP_LEN) != EP_LEN) _exit(91);
            for (int q = 0; q < world; q++)
                if (read(down[r][0], eps[q], EP_LEN) != EP_LEN) _exit(92);
            int rc = child(r, world, M, dp, eps);
            sy_dataplane_destroy(&dp);
            _exit(rc);
        }
    }
    char eps[MAXW][EP_LEN];
    for (int r = 0; r < world; r++) assert_int_equal(read(up[r][0], eps[r], EP_LEN), EP_LEN);
    for (int r = 0; r < world; r++)
        for (int q = 0; q < world; q++) assert_int_equal(write(down[r][1], eps[q], EP_LEN), EP_LEN);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int failed = 0;
    for (int r = 0; r < world; r++) {
        int st = 0;
        for (;;) {
            pid_t p = waitpid(pid[r], &st, WNOHANG);
            if (p == pid[r]) break;
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (t.tv_sec - t0.tv_sec > 20) {
                for (int q = 0; q < world; q++) kill(pid[q], SIGKILL);
                fail_msg("world %d: rank %d did not finish in 20 s", world, r);
            }
            usleep(10000);
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "world %d M %d: rank %d exited with %d\n", world, M, r, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
            failed++;
        }
        close(up[r][0]), close(up[r][1]), close(down[r][0]), close(down[r][1]);
    }
    assert_int_equal(failed, 0);
}

static void test_w2(void **s) { (void)s; run_world(2, 2); }
static void test_w3_uneven(void **s) { (void)s; run_world(3, 3); }
static void test_w4(void **s) { (void)s; run_world(4, 4); }
static void test_w4_idle_ranks(void **s) { (void)s; run_world(4, 2); } /* ranks 2, 3 only serve */
static void test_w3_scattered(void **s) {
    (void)s;
    g_scattered = 1;
    run_world(3, 3);
    run_world(4, 3);
    g_scattered = 0;
}
static void test_bf16_wire(void **s) {
    (void)s;
    g_bf16 = true;
    run_world(3, 3);
    run_world(4, 2);
    g_bf16 = false;
}
/* The staging path a device backend takes (download, all-to-all of host buffers, upload). */
static void test_staged_wire(void **s) {
    (void)s;
    g_staged = true;
    run_world(3, 3);
    g_bf16 = true;
    g_scattered = 1;
    run_world(4, 2);
    g_scattered = 0;
    g_bf16 = false;
    g_staged = false;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_w2),
        cmocka_unit_test(test_w3_uneven),
        cmocka_unit_test(test_w4),
        cmocka_unit_test(test_w4_idle_ranks),
        cmocka_unit_test(test_w3_scattered),
        cmocka_unit_test(test_bf16_wire),
        cmocka_unit_test(test_staged_wire),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
