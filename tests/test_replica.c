/* Peer replicas of expert state (src/worker/replica.h), with three ranks as threads over the
 * `threads` data plane. Every value of the state of step s is a known function of (s, buffer,
 * index) — the same on every rank for dense, written only by the owner for an expert (other
 * ranks hold rank-dependent junk there) — so a restored state is checked value by value:
 *   - step 4 is exchanged on the caller's thread over the training communicator
 *     (sy_replica_exchange), step 5 overlapped (sy_replica_post over a second communicator of a
 *     second data plane): every rank writes "update 6" into the live buffers as soon as
 *     sy_replica_wait_copied returns, while step 5's exchange may still be on the wire, then
 *     waits; rank 2 dies before its replicas of 6 go out: the holdings are live 6 (dense + own),
 *     the copies of steps 4 and 5 (dense + own), the slots of steps 4 and 5 holding the experts
 *     of rank r - 1;
 *   - a request for a state a rank does not hold (expert 2 of step 6 on rank 0) is SY_EINVAL
 *     naming it, and leaves the live state as it was;
 *   - the two survivors restore step 5 over a new communicator of 2 ranks with a new placement:
 *     dense from rank 0's prev, dead rank 2's experts from rank 0's replica slot (one kept
 *     locally, one sent to rank 1): every dense and owned-expert weight and moment equals its
 *     step-5 value bit for bit, the optimizer step count is step 5's, the live step is 5. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu_setup.h"
#include "base/config.h"
#include "comm/comm.h"
#include "model/model.h"
#include "model/optim.h"
#include "worker/replica.h"
#include "sy_test.h"

#define W 3
#define E 6

typedef struct {
    pthread_barrier_t ready, died, done;
    char eps[W][256], reps[W][256];
    int code[W];
} world_t;

static world_t g_w;

/* The value of element i of buffer b (0 weights, 1 m, 2 v) of the state of step s. */
static float val(int64_t s, int b, size_t i) {
    uint64_t h = (uint64_t)s * 0x9E3779B97F4A7C15ull ^ ((uint64_t)b << 56) ^ (uint64_t)i * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 29;
    return (float)((double)(h >> 11) / 9007199254740992.0) - 0.5f;
}

/* Writes the state of step s: dense, and the experts in `mine`; junk of `rank` elsewhere. */
static void fill_state(sy_model_t *m, sy_adamw_t *o, int64_t s, const bool *mine, int rank) {
    sy_backend_t *be = sy_model_backend(m);
    size_t n = sy_model_numel(m);
    float *h = malloc(sizeof(float) * n);
    float *bufs[3] = {sy_model_params(m), sy_adamw_m(o), sy_adamw_v(o)};
    for (int b = 0; b < 3; b++) {
        for (int i = 0; i < sy_model_n_params(m); i++) {
            const sy_param_t *p = sy_model_param(m, i);
            bool real = p->expert < 0 || mine[p->expert];
            for (size_t j = 0; j < p->numel; j++)
                h[p->offset + j] = real ? val(s, b, p->offset + j) : (float)(1000 + rank);
        }
        be->upload(be, bufs[b], h, sizeof(float) * n);
    }
    sy_adamw_set_t_count(o, s * 10);
    free(h);
}

/* Dense and the experts in `mine` hold step s's values exactly; the number of mismatches. */
static size_t mismatches(sy_model_t *m, sy_adamw_t *o, int64_t s, const bool *mine) {
    sy_backend_t *be = sy_model_backend(m);
    size_t n = sy_model_numel(m), bad = 0;
    float *h = malloc(sizeof(float) * n);
    float *bufs[3] = {sy_model_params(m), sy_adamw_m(o), sy_adamw_v(o)};
    for (int b = 0; b < 3; b++) {
        be->download(be, h, bufs[b], sizeof(float) * n);
        for (int i = 0; i < sy_model_n_params(m); i++) {
            const sy_param_t *p = sy_model_param(m, i);
            if (p->expert >= 0 && !mine[p->expert]) continue;
            for (size_t j = 0; j < p->numel; j++) bad += h[p->offset + j] != val(s, b, p->offset + j);
        }
    }
    free(h);
    return bad;
}

#define CK(cond, ...)                                                                                   \
    do {                                                                                                \
        if (!(cond)) {                                                                                  \
            fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", rank, __FILE__, __LINE__, #cond);      \
            fprintf(stderr, __VA_ARGS__);                                                               \
            fprintf(stderr, " [%s]\n", sy_err_msg());                                                   \
            code = 1;                                                                                   \
            goto out;                                                                                   \
        }                                                                                               \
    } while (0)

/* One rank's model, optimizer, replica module and two `threads` data planes (training,
 * replicas), its endpoints published in eps[rank] and reps[rank]. wd: weight decay (< 0: the
 * default). */
typedef struct {
    sy_config_t cfg;
    sy_backend_t *be;
    sy_model_t *m;
    sy_adamw_t *o;
    sy_replica_t *r;
    sy_dataplane_t *dp, *rdp;
} rank_state;

static void rank_open(rank_state *k, int rank, double wd, char eps[][256], char reps[][256]) {
    memset(k, 0, sizeof *k);
    sy_config_defaults(&k->cfg);
    k->cfg.model.d_model = 16, k->cfg.model.d_ff = 24, k->cfg.model.n_layers = 2, k->cfg.model.n_heads = 2;
    k->cfg.model.n_experts = E, k->cfg.model.seq_len = 8, k->cfg.model.vocab_size = 32;
    if (wd >= 0) k->cfg.train.weight_decay = wd;
    sy_model_dims d = sy_model_dims_from_config(&k->cfg);
    sy_backend_cpu_new(1, false, &k->be);
    sy_model_new(&d, k->be, &k->m);
    sy_adamw_new(k->m, &k->cfg, &k->o);
    sy_replica_new(k->m, k->o, &k->r);
    sy_dataplane_new("threads", NULL, &k->dp);
    sy_dataplane_new("threads", NULL, &k->rdp);
    snprintf(eps[rank], 256, "%s", sy_dataplane_endpoint(k->dp));
    snprintf(reps[rank], 256, "%s", sy_dataplane_endpoint(k->rdp));
}

/* After the rank's communicators are gone (and its replica thread let go of them). */
static void rank_close(rank_state *k) {
    sy_dataplane_destroy(&k->dp);
    sy_dataplane_destroy(&k->rdp);
    sy_replica_destroy(&k->r);
    sy_adamw_destroy(&k->o);
    sy_model_destroy(&k->m);
    sy_backend_destroy(&k->be);
    sy_config_free(&k->cfg);
}

static void *rank_main(void *arg) {
    const int rank = (int)(intptr_t)arg;
    int code = 0;
    rank_state k;
    rank_open(&k, rank, -1, g_w.eps, g_w.reps);
    sy_model_t *m = k.m;
    sy_adamw_t *o = k.o;
    sy_replica_t *r = k.r;
    sy_dataplane_t *dp = k.dp, *rdp = k.rdp;
    sy_comm_t *c3 = NULL, *c2 = NULL, *rc3 = NULL;
    bool dead = false, at_died = false;
    pthread_barrier_wait(&g_w.ready);
    const char *eps[W] = {g_w.eps[0], g_w.eps[1], g_w.eps[2]};
    const char *reps[W] = {g_w.reps[0], g_w.reps[1], g_w.reps[2]};
    const uint32_t place3[E] = {0, 0, 1, 1, 2, 2};
    bool own3[E];
    for (int e = 0; e < E; e++) own3[e] = (int)place3[e] == rank;
    CK(sy_comm_new(dp, 1, rank, W, eps, 5000, &c3) == SY_OK, "comm of 3");
    CK(sy_comm_new(rdp, 1, rank, W, reps, 5000, &rc3) == SY_OK, "replica comm of 3");
    fill_state(m, o, 4, own3, rank);
    sy_replica_set_live(r, 4, own3);
    CK(sy_replica_exchange(r, c3, place3, 1) == SY_OK, "exchange of step 4");
    fill_state(m, o, 5, own3, rank);
    sy_replica_set_live(r, 5, own3);
    CK(sy_replica_post(r, rc3, place3, 1) == SY_OK, "post of step 5");
    sy_replica_wait_copied(r);
    fill_state(m, o, 6, own3, rank); /* update 6, maybe while 5 is on the wire */
    CK(sy_replica_wait(r) == SY_OK, "overlapped exchange of step 5");
    sy_replica_set_live(r, 6, own3); /* rank 2 dies before its replicas of 6 go out */
    sy_comm_destroy(&rc3);
    sy_comm_destroy(&c3);
    if (rank == 2) dead = true;
    pthread_barrier_wait(&g_w.died);
    at_died = true;
    if (dead) goto out;

    sy_replica_held h[SY_REPLICA_MAX_HELD];
    int nh = sy_replica_holdings(r, h);
    CK(nh == 5, "%d states held, want live, two copies, two slots", nh);
    CK(h[0].step == 6 && h[0].dense && h[0].experts[2 * rank] && h[0].experts[2 * rank + 1], "live 6");
    int from = (rank + W - 1) % W;
    for (int64_t s = 4; s <= 5; s++) {
        int copies = 0, slots = 0;
        for (int k = 1; k < nh; k++) {
            if (h[k].step != s) continue;
            copies += h[k].dense && h[k].experts[2 * rank] && h[k].experts[2 * rank + 1] && !h[k].experts[2 * from];
            slots += !h[k].dense && h[k].experts[2 * from] && h[k].experts[2 * from + 1] && !h[k].experts[2 * rank];
        }
        CK(copies == 1 && slots == 1, "step %lld: %d copies of dense + own, %d slots of rank %d's experts", (long long)s,
           copies, slots, from);
    }

    if (rank == 0) { /* a state rank 0 does not hold: refused before anything changes */
        const int32_t src[E] = {0, 0, 0, 0, 0, 0};
        const uint32_t place1[E] = {0, 0, 0, 0, 0, 0};
        char note[200];
        CK(sy_replica_restore(r, NULL, 0, 1, 6, 0, src, place1, note, sizeof note) == SY_EINVAL, "not held");
        CK(strstr(sy_err_msg(), "expert 2 of step 6") != NULL, "the error names it");
        CK(sy_replica_live_step(r) == 6 && mismatches(m, o, 6, own3) == 0, "live state untouched");
    }
    /* survivors 0, 1: new world of 2; experts 4 (dead rank 2's) stay on 0, 5 go to 1 */
    const uint32_t place2[E] = {0, 0, 1, 1, 0, 1};
    const int32_t src2[E] = {0, 0, 1, 1, 0, 0};
    bool own2[E];
    for (int e = 0; e < E; e++) own2[e] = (int)place2[e] == rank;
    CK(sy_comm_new(dp, 2, rank, 2, eps, 5000, &c2) == SY_OK, "comm of 2");
    char note[200];
    CK(sy_replica_restore(r, c2, rank, 2, 5, 0, src2, place2, note, sizeof note) == SY_OK, "restore");
    size_t bad = mismatches(m, o, 5, own2);
    CK(bad == 0, "%zu values differ from step 5 after the restore (%s)", bad, note);
    CK(sy_adamw_t_count(o) == 50, "optimizer step count %lld", (long long)sy_adamw_t_count(o));
    CK(sy_replica_live_step(r) == 5, "live step %lld", (long long)sy_replica_live_step(r));
    printf("rank %d: %s\n", rank, note);
out:
    if (!at_died) pthread_barrier_wait(&g_w.died); /* a failure before it must not hang the others */
    g_w.code[rank] = code;
    pthread_barrier_wait(&g_w.done);
    if (r) (void)sy_replica_wait(r); /* its thread lets go of rc3 */
    sy_comm_destroy(&rc3);
    sy_comm_destroy(&c2);
    sy_comm_destroy(&c3);
    rank_close(&k);
    return NULL;
}

/* Delta exchanges: step 4's state goes out whole, then three real AdamW steps (5, 6, 7: random
 * clipped gradients, learning rates and weight decay) go out as gradients, which each buddy
 * applies to its replicas. Rank 2 then dies; the survivors restore step 7 with rank 2's experts
 * from rank 0's replica slot: every dense and expert weight and moment equals, bit for bit, what
 * its owner's own update computed (g_delta.want, each owner's live state after step 7). */
static struct {
    pthread_barrier_t ready, stepped, died, done;
    char eps[W][256], reps[W][256];
    float *want[W][3]; /* [rank][weights, m, v] the live state after step 7 (dense + own) */
    int code[W];
} g_delta;

static void *rank_delta_main(void *arg) {
    const int rank = (int)(intptr_t)arg;
    int code = 0;
    rank_state k;
    rank_open(&k, rank, 0.1, g_delta.eps, g_delta.reps);
    sy_backend_t *be = k.be;
    sy_model_t *m = k.m;
    sy_adamw_t *o = k.o;
    sy_replica_t *r = k.r;
    sy_dataplane_t *dp = k.dp, *rdp = k.rdp;
    sy_comm_t *c2 = NULL, *rc3 = NULL;
    float *h = NULL;
    bool dead = false, at_died = false;
    sy_replica_set_piece_bytes(r, 200); /* several pieces a step, whole or gradients */
    pthread_barrier_wait(&g_delta.ready);
    const char *eps[W] = {g_delta.eps[0], g_delta.eps[1], g_delta.eps[2]};
    const char *reps[W] = {g_delta.reps[0], g_delta.reps[1], g_delta.reps[2]};
    const uint32_t place3[E] = {0, 0, 1, 1, 2, 2};
    bool own3[E];
    for (int e = 0; e < E; e++) own3[e] = (int)place3[e] == rank;
    const size_t n = sy_model_numel(m);
    h = malloc(sizeof(float) * n);
    CK(h != NULL, "memory");
    CK(sy_comm_new(rdp, 1, rank, W, reps, 5000, &rc3) == SY_OK, "replica comm of 3");
    fill_state(m, o, 4, own3, rank);
    sy_replica_set_live(r, 4, own3);
    CK(sy_replica_post(r, rc3, place3, 1) == SY_OK && sy_replica_wait(r) == SY_OK, "exchange of step 4");
    CK(sy_replica_get_stats(r).deltas == 0, "step 4 went out whole");
    for (int64_t s = 5; s <= 7; s++) {
        for (size_t i = 0; i < n; i++) h[i] = 0.05f * val(100 + s, 0, i);
        be->upload(be, sy_model_grads(m), h, sizeof(float) * n);
        sy_adamw_step_owned(o, 1e-3 * (double)s, own3);
        sy_replica_stepped(r, s);
        CK(sy_replica_post(r, rc3, place3, 1) == SY_OK, "post of step %lld", (long long)s);
        sy_replica_wait_copied(r);
        CK(sy_replica_wait(r) == SY_OK, "exchange of step %lld", (long long)s);
    }
    sy_replica_stats st = sy_replica_get_stats(r);
    CK(st.deltas == 3 && st.exchanges == 4, "%llu of %llu exchanges sent gradients, want 3 of 4",
       (unsigned long long)st.deltas, (unsigned long long)st.exchanges);
    float *bufs[3] = {sy_model_params(m), sy_adamw_m(o), sy_adamw_v(o)};
    for (int b = 0; b < 3; b++) {
        g_delta.want[rank][b] = malloc(sizeof(float) * n);
        CK(g_delta.want[rank][b] != NULL, "memory");
        be->download(be, g_delta.want[rank][b], bufs[b], sizeof(float) * n);
    }
    sy_comm_destroy(&rc3);
    if (rank == 2) dead = true;
    pthread_barrier_wait(&g_delta.died);
    at_died = true;
    if (dead) goto out;
    /* survivors 0, 1: experts 4 (dead rank 2's) stay on 0, 5 go to 1, both from rank 0's slot */
    const uint32_t place2[E] = {0, 0, 1, 1, 0, 1};
    const int32_t src2[E] = {0, 0, 1, 1, 0, 0};
    CK(sy_comm_new(dp, 2, rank, 2, eps, 5000, &c2) == SY_OK, "comm of 2");
    char note[200];
    CK(sy_replica_restore(r, c2, rank, 2, 7, 0, src2, place2, note, sizeof note) == SY_OK, "restore");
    CK(strstr(note, rank == 0 ? "1 from this worker's copies, 0 received" : "1 received") != NULL, "%s", note);
    size_t bad = 0, checked = 0;
    for (int b = 0; b < 3; b++) {
        be->download(be, h, bufs[b], sizeof(float) * n);
        for (int i = 0; i < sy_model_n_params(m); i++) {
            const sy_param_t *p = sy_model_param(m, i);
            if (p->expert >= 0 && (int)place2[p->expert] != rank) continue;
            const float *want = g_delta.want[p->expert < 0 ? 0 : (int)place3[p->expert]][b];
            for (size_t j = 0; j < p->numel; j++, checked++)
                bad += memcmp(&h[p->offset + j], &want[p->offset + j], sizeof(float)) != 0;
        }
    }
    CK(checked > 0 && bad == 0, "%zu of %zu values differ from their owners' step 7 (%s)", bad, checked, note);
    /* not vacuous: step 7 differs from step 4 */
    CK(mismatches(m, o, 4, (const bool[E]){0}) > 0, "the restored state is not step 4's");
    CK(sy_adamw_t_count(o) == 43, "optimizer step count %lld", (long long)sy_adamw_t_count(o));
    printf("rank %d: %s\n", rank, note);
out:
    if (!at_died) pthread_barrier_wait(&g_delta.died);
    g_delta.code[rank] = code;
    pthread_barrier_wait(&g_delta.done);
    if (r) (void)sy_replica_wait(r);
    sy_comm_destroy(&rc3);
    sy_comm_destroy(&c2);
    rank_close(&k);
    free(h);
    return NULL;
}

static void test_delta_exact(void **s) {
    (void)s;
    pthread_barrier_init(&g_delta.ready, NULL, W);
    pthread_barrier_init(&g_delta.died, NULL, W);
    pthread_barrier_init(&g_delta.done, NULL, W);
    pthread_t th[W];
    for (int k = 0; k < W; k++) assert_int_equal(pthread_create(&th[k], NULL, rank_delta_main, (void *)(intptr_t)k), 0);
    for (int k = 0; k < W; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < W; k++)
        for (int b = 0; b < 3; b++) free(g_delta.want[k][b]);
    for (int k = 0; k < W; k++) assert_int_equal(g_delta.code[k], 0);
}

static void test_exchange_restore(void **s) {
    (void)s;
    pthread_barrier_init(&g_w.ready, NULL, W);
    pthread_barrier_init(&g_w.died, NULL, W);
    pthread_barrier_init(&g_w.done, NULL, W);
    pthread_t th[W];
    for (int k = 0; k < W; k++) assert_int_equal(pthread_create(&th[k], NULL, rank_main, (void *)(intptr_t)k), 0);
    for (int k = 0; k < W; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < W; k++) assert_int_equal(g_w.code[k], 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_exchange_restore),
                                       cmocka_unit_test(test_delta_exact)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
