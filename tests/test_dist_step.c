/* sy_dist_step's dense fp64 all-reduce on a backend without a host view (issue 10's leftover):
 * the staging fallback of dist_step.c (download the accumulator, all-reduce the host copy,
 * upload the sums), taken whenever the comm reads host memory and be->host_view() is NULL, as on
 * a device backend with the tcp data plane.
 *
 * The poisoned-handle CPU backend (SY_BACKEND_POISON=1, backend_poison.c: host_view() is NULL,
 * any host access of its buffers crashes) runs the tiny config for STEPS steps with W = 2 ranks
 * as threads on the "threads" data plane (expert parallelism included), and once with W = 1
 * (no comm, no all-reduce). W-invariance (model spec §5: the rank-order fp64 sum, rounded once)
 * makes every step's global gradient norm and the dense parameters after the last step
 * bit-identical between the two, on both ranks. A fallback that dropped the upload, summed in
 * another order or staged the wrong length changes the ranks' dense gradients and fails the
 * comparison.
 *
 * The same runs check the per-expert counts a StepDone carries: with W = 1 every expert's counts
 * of the rank's micro-batches; with W = 2 (counts_owned) each owner's counts of the whole step
 * for its experts, from the expert-parallel exchange. Put together by the placement (as the
 * coordinator does) they must equal W = 1's at every step, and they are not all zero. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/config.h"
#include "comm/comm.h"
#include "data/data.h"
#include "model/model.h"
#include "model/optim.h"
#include "model/switch_ep.h"
#include "worker/dist_step.h"
#include "sy_test.h"

#define STEPS 2
#define WMAX 2

static char g_dir[256];
static sy_config_t g_cfg;

typedef struct {
    int rank, world;
    sy_dataplane_t *dp;
    const char **eps;
    double norm[STEPS];
    int32_t *counts[STEPS]; /* [n_switch, E] or, counts_owned, [n_switch, n_owned] */
    bool counts_owned[STEPS];
    int n_switch, E, n_owned;
    int owned_list[64];
    float *dense; /* [dense numel] parameters after the last step (host copy) */
    size_t n_dense;
    sy_status st;
    char err[256];
} rank_run;

static void *rank_main(void *arg) {
    rank_run *r = arg;
    const sy_config_t *cfg = &g_cfg;
    sy_backend_t *be = NULL;
    sy_model_t *m = NULL;
    sy_adamw_t *opt = NULL;
    sy_data_t *data = NULL;
    sy_comm_t *comm = NULL;
    sy_ep_t *ep = NULL;
    int32_t *tokens = NULL;
    sy_status st;
    sy_model_dims d = sy_model_dims_from_config(cfg);
    bool owned[64];
    uint32_t placement[64];
    SY_CHECK_GOTO(sy_backend_cpu_new(1, false, &be), st, done);
    SY_CHECK_GOTO(sy_model_new(&d, be, &m), st, done);
    SY_CHECK_GOTO(sy_adamw_new(m, cfg, &opt), st, done);
    sy_data_options dopts;
    sy_data_options_from_config(cfg, &dopts);
    SY_CHECK_GOTO(sy_data_open_with((const char *const *)cfg->data.train.items, cfg->data.train.n,
                                    cfg->model.vocab_size, cfg->model.seq_len, &dopts, &data), st, done);
    tokens = malloc(sizeof(int32_t) * (size_t)d.B * (d.T + 1));
    for (int e = 0; e < d.E; e++) placement[e] = (uint32_t)(e % r->world), owned[e] = (int)placement[e] == r->rank;
    if (r->world > 1) {
        SY_CHECK_GOTO(sy_comm_new(r->dp, 1, r->rank, r->world, r->eps, 60000, &comm), st, done);
        SY_CHECK_GOTO(sy_ep_new(be, comm, placement, d.E, d.D, d.F, d.B * d.T, sy_model_n_switch(m), &ep), st, done);
        sy_model_set_ep(m, ep, r->rank);
    }
    sy_model_init(m, cfg->run.seed);
    sy_dist_ctx c = {.cfg = cfg, .model = m, .opt = opt, .data = data, .comm = comm,
                     .owned = r->world > 1 ? owned : NULL, .tokens = tokens};
    r->n_switch = sy_model_n_switch(m), r->E = d.E, r->n_owned = 0;
    for (int e = 0; e < d.E; e++)
        if (owned[e] || r->world == 1) r->owned_list[r->n_owned++] = e;
    for (int s = 1; s <= STEPS; s++) {
        sy_step_result res = {.counts = calloc((size_t)r->n_switch * d.E, sizeof(int32_t))};
        r->counts[s - 1] = res.counts;
        SY_CHECK_GOTO(sy_dist_step(&c, s, &res), st, done);
        r->norm[s - 1] = res.grad_norm;
        r->counts_owned[s - 1] = res.counts_owned;
    }
    r->n_dense = sy_model_dense_numel(m);
    r->dense = malloc(sizeof(float) * r->n_dense);
    be->download(be, r->dense, sy_model_params(m), sizeof(float) * r->n_dense);
    st = SY_OK;
done:
    if (st != SY_OK) snprintf(r->err, sizeof r->err, "%s", sy_err_msg());
    r->st = st;
    if (m) sy_model_set_ep(m, NULL, 0);
    sy_ep_destroy(&ep);
    sy_comm_destroy(&comm);
    sy_data_destroy(&data);
    sy_adamw_destroy(&opt);
    sy_model_destroy(&m);
    sy_backend_destroy(&be);
    free(tokens);
    return NULL;
}

static void run_world(int W, rank_run *runs) {
    sy_dataplane_t *dps[WMAX] = {0};
    const char *eps[WMAX];
    for (int q = 0; q < W && W > 1; q++) {
        assert_int_equal(sy_dataplane_new("threads", NULL, &dps[q]), SY_OK);
        eps[q] = sy_dataplane_endpoint(dps[q]);
    }
    pthread_t th[WMAX];
    for (int q = 0; q < W; q++) {
        runs[q] = (rank_run){.rank = q, .world = W, .dp = dps[q], .eps = eps};
        assert_int_equal(pthread_create(&th[q], NULL, rank_main, &runs[q]), 0);
    }
    for (int q = 0; q < W; q++) pthread_join(th[q], NULL);
    for (int q = 0; q < W; q++) {
        if (runs[q].st != SY_OK) fprintf(stderr, "W=%d rank %d: %s\n", W, q, runs[q].err);
        assert_int_equal(runs[q].st, SY_OK);
    }
    for (int q = 0; q < W && W > 1; q++) sy_dataplane_destroy(&dps[q]);
}

static void test_dense_allreduce_staged(void **state) {
    (void)state;
    setenv("SY_BACKEND_POISON", "1", 1); /* host_view() NULL: the staging fallback */
    sy_backend_t *probe = NULL;
    assert_int_equal(sy_backend_cpu_new(1, false, &probe), SY_OK);
    void *p = probe->alloc(probe, 64);
    assert_null(probe->host_view(probe, p)); /* the premise: no host view */
    probe->free(probe, p);
    sy_backend_destroy(&probe);

    rank_run one[1], two[WMAX];
    run_world(1, one);
    run_world(2, two);
    for (int q = 0; q < 2; q++) {
        for (int s = 0; s < STEPS; s++) {
            fprintf(stderr, "step %d rank %d: grad norm %.17g (W=1: %.17g)\n", s + 1, q, two[q].norm[s], one[0].norm[s]);
            assert_memory_equal(&two[q].norm[s], &one[0].norm[s], sizeof(double));
        }
        assert_int_equal(two[q].n_dense, one[0].n_dense);
        size_t diff = 0;
        for (size_t i = 0; i < one[0].n_dense; i++) diff += memcmp(&two[q].dense[i], &one[0].dense[i], sizeof(float)) != 0;
        fprintf(stderr, "rank %d: %zu of %zu dense parameters differ from W=1\n", q, diff, one[0].n_dense);
        assert_int_equal(diff, 0);
    }
    /* the step moved the parameters: the comparison is not of two untouched models */
    assert_true(one[0].norm[0] > 0);
    /* per-expert counts: W = 2's owners' counts, placed by expert, equal W = 1's */
    const int L = one[0].n_switch, E = one[0].E;
    assert_true(L > 0 && E <= 64);
    for (int s = 0; s < STEPS; s++) {
        assert_false(one[0].counts_owned[s]);
        int64_t sum = 0;
        int32_t got[L * E];
        memset(got, 0, sizeof got);
        for (int q = 0; q < 2; q++) {
            assert_true(two[q].counts_owned[s]);
            for (int l = 0; l < L; l++)
                for (int i = 0; i < two[q].n_owned; i++)
                    got[l * E + two[q].owned_list[i]] += two[q].counts[s][l * two[q].n_owned + i];
        }
        for (int i = 0; i < L * E; i++) sum += one[0].counts[s][i];
        fprintf(stderr, "step %d: %lld tokens routed in %d Switch layers; W=2 owners' counts %s W=1's\n", s + 1,
                (long long)sum, L, memcmp(got, one[0].counts[s], sizeof got) ? "DIFFER from" : "equal");
        assert_true(sum > 0);
        assert_memory_equal(got, one[0].counts[s], sizeof got);
    }
    for (int s = 0; s < STEPS; s++) {
        free(one[0].counts[s]);
        for (int q = 0; q < 2; q++) free(two[q].counts[s]);
    }
    for (int q = 0; q < 2; q++) free(two[q].dense);
    free(one[0].dense);
    unsetenv("SY_BACKEND_POISON");
}

static int setup(void **state) {
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/sy-test-dist-XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    /* one shard of pseudo-text bytes */
    enum { NTOK = 40000 };
    uint16_t *t = malloc(sizeof(uint16_t) * NTOK);
    for (int i = 0; i < NTOK; i++) t[i] = (uint16_t)(32 + (urand() < 0.2 ? 0 : (int)(urand() * 26) + 65));
    char path[320], set[400];
    snprintf(path, sizeof path, "%s/train_000.bin", g_dir);
    sy_status st = sy_data_write_shard(path, t, NTOK);
    free(t);
    if (st != SY_OK) return -1;
    const char *src = getenv("SY_SRC");
    char cfgp[512];
    snprintf(cfgp, sizeof cfgp, "%s/configs/tiny.yaml", src ? src : ".");
    if (sy_config_defaults(&g_cfg) != SY_OK || sy_config_load(&g_cfg, cfgp) != SY_OK) {
        fprintf(stderr, "config: %s\n", sy_err_msg());
        return -1;
    }
    snprintf(set, sizeof set, "data.train=%s", path);
    const char *sets[] = {set, "data.val=", "train.threads=1", "data.prefetch_steps=0"};
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
        if (sy_config_set(&g_cfg, sets[i]) != SY_OK) {
            fprintf(stderr, "config %s: %s\n", sets[i], sy_err_msg());
            return -1;
        }
    return sy_config_validate(&g_cfg) == SY_OK ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    sy_config_free(&g_cfg);
    sy_test_rmtree(g_dir);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense_allreduce_staged),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
