/* Peer replicas of expert state: see replica.h. */
#include "worker/replica.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/bgsched.h"
#include "base/clock.h"
#include "base/log.h"

/* One expert's state in a replica, a piece or a restore message: for each of its tensors in
 * parameter-table order, weights then first moment then second moment (fp32). One expert's
 * gradients in a delta exchange: for each of its tensors in the same order, the clipped fp32
 * gradient its owner's update consumed. */
typedef struct {
    int64_t step; /* -1: invalid (empty, or being received) */
    bool *have;   /* [E] */
    size_t *off;  /* [E] byte offset of expert e in buf */
    char *buf;
    size_t cap;
} slot;

/* A host copy of dense + the owned experts of one step: [dense weights | m | v][owned experts,
 * ascending, each as in a slot]. The expert part is also the send buffer of an exchange. */
typedef struct {
    int64_t step; /* -1: invalid */
    int64_t t;    /* the optimizer step count */
    double lr;    /* the learning rate of step's update (a delta exchange's receivers apply it) */
    bool *owned;  /* [E] */
    size_t *off;  /* [E] byte offset of owned expert e in buf */
    size_t n_own;
    char *buf;
    size_t cap;
} stage;

/* The overlapped exchange's job (guarded by mu). */
typedef enum { JOB_NONE, JOB_COPY, JOB_EXCHANGE, JOB_DONE } job_phase;

struct sy_replica {
    sy_model_t *model;
    sy_adamw_t *opt;
    sy_backend_t *be;
    int E;
    size_t numel, dense;
    size_t expert_bytes;  /* one expert's state (all experts have the same shapes) */
    size_t expert_gbytes; /* one expert's gradients (a third of its state) */
    int64_t live_step;
    bool *live_owned;     /* [E] */
    /* the live state is the update of live_step - 1 by the gradients in the model's buffer, at
     * the optimizer's last learning rate and step count (sy_replica_stepped) */
    bool live_stepped;
    /* the last exchange, if it succeeded and nothing replaced a state since: its step, placement
     * and replicas (every rank holds whole replicas of chain_step from it). A delta exchange of
     * step chain_step + 1 under the same placement builds on it. */
    bool chain_ok;
    int chain_slot; /* the slot it filled: a delta exchange's base (the other one is its target) */
    int64_t chain_step;
    uint32_t *chain_place; /* [E] */
    int chain_replicas;
    char *gsend, *grecv;   /* a delta exchange's gradients: this worker's experts, the buddies' */
    size_t gsend_cap, grecv_cap;
    size_t piece_bytes;
    stage stages[2];
    slot slots[2];
    char *send;           /* staging of a restore */
    size_t send_cap;
    /* the overlapped exchange: the thread, and the job it runs (mu guards everything below) */
    pthread_t th;
    bool th_started, th_quit;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job_phase phase;
    sy_comm_t *job_comm;
    uint32_t *job_place; /* [E] */
    int job_replicas, job_stage, job_slot;
    bool job_delta;
    sy_status job_st;
    char job_err[512];
    sy_replica_piece_fn piece_fn;
    void *piece_ctx;
    /* background scheduling (sy_replica_set_background): on, the replica data plane, whether the
     * thread and the plane's threads are in the idle class now, the thread's id */
    bool bg_on, bg_low;
    sy_dataplane_t *bg_dp;
    pid_t th_tid;
    /* cluster.replica_cpus (sy_replica_set_cpus): the thread's CPUs, or none */
    bool pin_on;
    cpu_set_t pin_cpus;
    /* an exchange in the idle class that training had to wait for long (the machine has no idle
     * time to give it): the next SY_REPLICA_BG_BACKOFF exchanges run in the normal class */
    int bg_skip;
    double last_post_s, post_interval_s;
    sy_replica_stats stats;
};

static sy_status grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return SY_OK;
    char *n = realloc(*buf, need);
    if (!n) return sy_err_set(SY_ENOMEM, "replicas: out of memory (%zu bytes)", need);
    *buf = n;
    *cap = need;
    return SY_OK;
}

sy_status sy_replica_new(sy_model_t *m, sy_adamw_t *opt, sy_replica_t **out) {
    sy_replica_t *r = calloc(1, sizeof *r);
    if (!r) return sy_err_set(SY_ENOMEM, "replicas: out of memory");
    r->model = m;
    r->opt = opt;
    r->be = sy_model_backend(m);
    r->E = sy_model_get_dims(m)->E;
    r->numel = sy_model_numel(m);
    r->dense = sy_model_dense_numel(m);
    for (int i = 0; i < sy_model_n_params(m); i++)
        if (sy_model_param(m, i)->expert == 0) r->expert_bytes += 3 * sizeof(float) * sy_model_param(m, i)->numel;
    r->expert_gbytes = r->expert_bytes / 3;
    r->piece_bytes = SY_REPLICA_PIECE_BYTES;
    int E = r->E > 0 ? r->E : 1;
    r->live_owned = calloc((size_t)E, sizeof(bool));
    r->job_place = calloc((size_t)E, sizeof(uint32_t));
    r->chain_place = calloc((size_t)E, sizeof(uint32_t));
    bool ok = r->live_owned && r->job_place && r->chain_place;
    for (int k = 0; k < 2; k++) {
        r->slots[k].step = -1;
        r->slots[k].have = calloc((size_t)E, sizeof(bool));
        r->slots[k].off = calloc((size_t)E, sizeof(size_t));
        r->stages[k].step = -1;
        r->stages[k].owned = calloc((size_t)E, sizeof(bool));
        r->stages[k].off = calloc((size_t)E, sizeof(size_t));
        ok = ok && r->slots[k].have && r->slots[k].off && r->stages[k].owned && r->stages[k].off;
    }
    r->live_step = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    if (!ok) {
        sy_replica_destroy(&r);
        return sy_err_set(SY_ENOMEM, "replicas: out of memory");
    }
    *out = r;
    return SY_OK;
}

static void settle(sy_replica_t *r);
static void bg_boost(sy_replica_t *r);

void sy_replica_destroy(sy_replica_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_replica_t *r = *self_p;
    settle(r);
    if (r->th_started) {
        pthread_mutex_lock(&r->mu);
        r->th_quit = true;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->th, NULL);
    }
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r->live_owned), free(r->job_place), free(r->chain_place);
    free(r->gsend), free(r->grecv);
    for (int k = 0; k < 2; k++) {
        free(r->slots[k].have), free(r->slots[k].off), free(r->slots[k].buf);
        free(r->stages[k].owned), free(r->stages[k].off), free(r->stages[k].buf);
    }
    free(r->send);
    free(r);
    *self_p = NULL;
}

void sy_replica_set_live(sy_replica_t *r, int64_t step, const bool *owned) {
    settle(r);
    r->live_step = step;
    r->live_stepped = false;
    r->chain_ok = false; /* the next exchange sends whole states */
    if (owned) memcpy(r->live_owned, owned, sizeof(bool) * (size_t)r->E);
}

void sy_replica_stepped(sy_replica_t *r, int64_t step) {
    settle(r);
    r->live_stepped = r->live_step >= 0 && step == r->live_step + 1;
    r->live_step = step;
}

void sy_replica_set_piece_bytes(sy_replica_t *r, size_t bytes) {
    r->piece_bytes = bytes ? bytes : SY_REPLICA_PIECE_BYTES;
}

int64_t sy_replica_live_step(const sy_replica_t *r) { return r->live_step; }

void sy_replica_forget(sy_replica_t *r) {
    settle(r);
    r->live_step = -1;
    r->live_stepped = r->chain_ok = false;
    r->slots[0].step = r->slots[1].step = -1;
    r->stages[0].step = r->stages[1].step = -1;
}

void sy_replica_set_piece_hook(sy_replica_t *r, sy_replica_piece_fn fn, void *ctx) {
    r->piece_fn = fn;
    r->piece_ctx = ctx;
}

sy_replica_stats sy_replica_get_stats(const sy_replica_t *r) { return r->stats; }

bool sy_replica_set_background(sy_replica_t *r, sy_dataplane_t *dp) {
    settle(r);
    pthread_mutex_lock(&r->mu);
    bg_boost(r);
    r->bg_dp = dp;
    r->bg_on = dp && sy_bg_available();
    pthread_mutex_unlock(&r->mu);
    return r->bg_on;
}

int sy_replica_set_cpus(sy_replica_t *r, const cpu_set_t *cpus) {
    pthread_mutex_lock(&r->mu);
    r->pin_on = cpus != NULL;
    if (cpus) r->pin_cpus = *cpus;
    const int e = cpus && r->th_tid ? sy_affinity_set(r->th_tid, cpus) : 0;
    pthread_mutex_unlock(&r->mu);
    return e;
}

/* ---- moving one expert's state ---------------------------------------------------------- */

/* Buffers bufs[0..nb) (backend, the parameters' layout) of expert e -> host dst, tensor by tensor
 * in parameter-table order, the nb buffers of each tensor in turn; returns the end of what it
 * wrote. */
static char *download_expert(sy_replica_t *r, int e, float *const *bufs, int nb, char *dst) {
    for (int i = 0; i < sy_model_n_params(r->model); i++) {
        const sy_param_t *p = sy_model_param(r->model, i);
        if (p->expert != e) continue;
        const size_t b = sizeof(float) * p->numel;
        for (int k = 0; k < nb; k++) r->be->download(r->be, dst, bufs[k] + p->offset, b), dst += b;
    }
    return dst;
}

/* Live buffers (backend) of expert e -> host dst (expert_bytes). */
static void pack_live(sy_replica_t *r, int e, char *dst) {
    float *const bufs[3] = {sy_model_params(r->model), sy_adamw_m(r->opt), sy_adamw_v(r->opt)};
    (void)download_expert(r, e, bufs, 3, dst);
}

/* The live dense state -> host dst: [dense weights | m | v], fp32 (3 x dense floats). */
static void download_dense(sy_replica_t *r, char *dst) {
    const size_t db = sizeof(float) * r->dense;
    r->be->download(r->be, dst, sy_model_params(r->model), db);
    r->be->download(r->be, dst + db, sy_adamw_m(r->opt), db);
    r->be->download(r->be, dst + 2 * db, sy_adamw_v(r->opt), db);
}

/* host src (expert_bytes) -> live buffers of expert e. */
static void unpack_live(sy_replica_t *r, int e, const char *src) {
    float *P = sy_model_params(r->model), *M = sy_adamw_m(r->opt), *V = sy_adamw_v(r->opt);
    for (int i = 0; i < sy_model_n_params(r->model); i++) {
        const sy_param_t *p = sy_model_param(r->model, i);
        if (p->expert != e) continue;
        size_t b = sizeof(float) * p->numel;
        r->be->upload(r->be, P + p->offset, src, b), src += b;
        r->be->upload(r->be, M + p->offset, src, b), src += b;
        r->be->upload(r->be, V + p->offset, src, b), src += b;
    }
}

/* ---- stages ----------------------------------------------------------------------------- */

/* stage <- live (dense + the live experts). Any thread, while nothing writes the live buffers. */
static sy_status stage_take(sy_replica_t *r, stage *sg) {
    double t0 = sy_mono_s();
    const size_t db = sizeof(float) * r->dense;
    size_t n_own = 0;
    for (int e = 0; e < r->E; e++) n_own += r->live_owned[e];
    sg->step = -1;
    SY_CHECK(grow(&sg->buf, &sg->cap, 3 * db + n_own * r->expert_bytes + 1));
    download_dense(r, sg->buf);
    size_t o = 3 * db;
    for (int e = 0; e < r->E; e++) {
        sg->owned[e] = r->live_owned[e];
        if (!sg->owned[e]) continue;
        sg->off[e] = o;
        if (r->expert_bytes) pack_live(r, e, sg->buf + o);
        o += r->expert_bytes;
    }
    sg->n_own = n_own;
    sg->t = sy_adamw_t_count(r->opt);
    sg->lr = sy_adamw_last_lr(r->opt);
    sg->step = r->live_step;
    r->stats.keep_ms += (sy_mono_s() - t0) * 1e3;
    return SY_OK;
}

/* The older stage (the one a new copy replaces). */
static int older_stage(const sy_replica_t *r) { return r->stages[0].step <= r->stages[1].step ? 0 : 1; }
static int older_slot(const sy_replica_t *r) { return r->slots[0].step <= r->slots[1].step ? 0 : 1; }

/* ---- the exchange after a step --------------------------------------------------------- */

static int owned_by(const uint32_t *placement, int E, int rank) {
    int n = 0;
    for (int e = 0; e < E; e++) n += (int)placement[e] == rank;
    return n;
}

/* The gradients of the live experts (ascending) -> r->gsend: what the update of the live step
 * consumed. The caller's thread, between that step and the next. */
static sy_status take_grads(sy_replica_t *r) {
    size_t n_own = 0;
    for (int e = 0; e < r->E; e++) n_own += r->live_owned[e];
    SY_CHECK(grow(&r->gsend, &r->gsend_cap, n_own * r->expert_gbytes + 1));
    float *const G[1] = {sy_model_grads(r->model)};
    char *dst = r->gsend;
    for (int e = 0; e < r->E; e++)
        if (r->live_owned[e]) dst = download_expert(r, e, G, 1, dst);
    return SY_OK;
}

/* A delta exchange is possible when every rank holds whole replicas of the live step's
 * predecessor under the same placement (the last exchange succeeded, nothing replaced a state
 * since) and the live state is that predecessor's update. Every rank of a communicator decides
 * alike: each went through the same generation start, steps and exchanges (a failure of any ends
 * the generation, and a new one starts with set_live or a restore, which break the chain). */
static bool can_delta(const sy_replica_t *r, const uint32_t *placement, int replicas) {
    return r->live_stepped && r->chain_ok && r->chain_step == r->live_step - 1 && r->chain_replicas == replicas &&
           !memcmp(r->chain_place, placement, sizeof(uint32_t) * (size_t)r->E);
}

/* The end of a delta exchange of step `step`: slot s <- the other slot's replicas of step - 1,
 * each updated by its owner's gradients (r->grecv, senders by j, their experts ascending) with
 * the same AdamW operations the owner ran (read from the base slot, written into s: no copy
 * first), in the layout of a whole exchange. */
static sy_status apply_grads(sy_replica_t *r, const uint32_t *placement, int replicas, int rank, int W,
                             const stage *sg, slot *s) {
    const slot *b = &r->slots[r->chain_slot];
    const size_t EB = r->expert_bytes;
    if (s == b || b->step != sg->step - 1)
        return sy_err_set(SY_EINTERNAL, "replicas: the gradients of step %lld have no base (the replicas held are of "
                          "step %lld)", (long long)sg->step, (long long)b->step);
    size_t need = 0;
    for (int j = 1; j <= replicas; j++) need += (size_t)owned_by(placement, r->E, (rank - j + W) % W) * EB;
    SY_CHECK(grow(&s->buf, &s->cap, need ? need : 1));
    memset(s->have, 0, sizeof(bool) * (size_t)r->E);
    size_t eo = 0;
    const char *g = r->grecv;
    for (int j = 1; j <= replicas; j++) {
        const int from = (rank - j + W) % W;
        for (int e = 0; e < r->E; e++) {
            if ((int)placement[e] != from) continue;
            if (!b->have[e])
                return sy_err_set(SY_EINTERNAL, "replicas: the gradients of expert %d of step %lld have no base",
                                  e, (long long)sg->step);
            char *st = s->buf + eo;
            const char *st0 = b->buf + b->off[e];
            for (int i = 0; i < sy_model_n_params(r->model); i++) {
                const sy_param_t *p = sy_model_param(r->model, i);
                if (p->expert != e) continue;
                const size_t n = p->numel, nb = sizeof(float) * n;
                sy_adamw_apply_host(r->opt, sg->lr, sg->t, p->decay, (float *)st, (float *)(st + nb),
                                    (float *)(st + 2 * nb), (const float *)st0, (const float *)(st0 + nb),
                                    (const float *)(st0 + 2 * nb), (const float *)g, n);
                st += 3 * nb, st0 += 3 * nb, g += nb;
            }
            s->have[e] = true, s->off[e] = eo, eo += EB;
        }
    }
    return SY_OK;
}

/* Sends stage sg's experts (placement[e] == rank, as the stage holds them) to the buddies and
 * receives theirs into slot s, named sg's step once whole (and, when `barrier`, once every rank
 * holds its own). delta: each sends the gradients of its experts (r->gsend, take_grads) instead,
 * and each buddy applies them to its replicas of the step before (apply_grads): a third of the
 * bytes, the same state. */
static sy_status exchange_from(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas,
                               const stage *sg, slot *s, bool barrier, bool delta) {
    const int W = sy_comm_world(comm), rank = sy_comm_rank(comm), E = r->E;
    const size_t unit = delta ? r->expert_gbytes : r->expert_bytes, PB = r->piece_bytes;
    double t0 = sy_mono_s();
    r->chain_ok = false;
    /* rounds: the same on every rank (from the largest owner's share), so collectives pair up */
    size_t most = 0;
    for (int q = 0; q < W; q++) {
        size_t b = (size_t)owned_by(placement, E, q) * unit;
        if (b > most) most = b;
    }
    const int rounds = (int)((most + PB - 1) / PB);
    /* what we send: our experts, ascending, straight from the stage (or their gradients) */
    const size_t mine = sg->n_own * unit;
    const char *send = delta ? r->gsend : sg->buf + 3 * sizeof(float) * r->dense;
    /* what we receive: buddy j's sender is rank - j; its experts ascending, senders by j */
    s->step = -1; /* invalid until every piece is in */
    size_t need = 0;
    for (int j = 1; j <= replicas; j++) need += (size_t)owned_by(placement, E, (rank - j + W) % W) * unit;
    if (delta) SY_CHECK(grow(&r->grecv, &r->grecv_cap, need ? need : 1));
    else SY_CHECK(grow(&s->buf, &s->cap, need ? need : 1));
    char *recv = delta ? r->grecv : s->buf;
    memset(s->have, 0, sizeof(bool) * (size_t)E);
    size_t base = 0;
    size_t sb[W], rb[W];
    for (int j = 1; j <= replicas; j++) {
        const int to = (rank + j) % W, from = (rank - j + W) % W;
        const size_t theirs = (size_t)owned_by(placement, E, from) * unit;
        for (int k = 0; k < rounds; k++) {
            size_t at = (size_t)k * PB;
            memset(sb, 0, sizeof sb);
            memset(rb, 0, sizeof rb);
            sb[to] = at < mine ? (mine - at < PB ? mine - at : PB) : 0;
            rb[from] = at < theirs ? (theirs - at < PB ? theirs - at : PB) : 0;
            /* send/recv point at the piece: the chunks of the other ranks are empty */
            SY_CHECK(sy_comm_alltoallv(comm, send + (sb[to] ? at : 0), sb, recv + base + (rb[from] ? at : 0), rb));
            if (r->piece_fn) r->piece_fn(r->piece_ctx, sg->step, k, rounds);
        }
        size_t eo = base;
        for (int e = 0; e < E && !delta; e++)
            if ((int)placement[e] == from) s->have[e] = true, s->off[e] = eo, eo += r->expert_bytes;
        base += theirs;
        r->stats.bytes_sent += mine;
        r->stats.bytes_received += theirs;
    }
    if (delta) SY_CHECK(apply_grads(r, placement, replicas, rank, W, sg, s));
    if (barrier) SY_CHECK(sy_comm_barrier(comm));
    s->step = sg->step;
    r->stats.exchanges++;
    r->stats.deltas += delta;
    r->stats.exchange_ms += (sy_mono_s() - t0) * 1e3;
    r->chain_ok = true;
    r->chain_slot = (int)(s - r->slots);
    r->chain_step = sg->step;
    r->chain_replicas = replicas;
    memcpy(r->chain_place, placement, sizeof(uint32_t) * (size_t)E);
    return SY_OK;
}

static bool nothing_to_send(const sy_replica_t *r, const sy_comm_t *comm, int replicas) {
    const int W = comm ? sy_comm_world(comm) : 1;
    if (replicas > W - 1) replicas = W - 1;
    return replicas <= 0 || r->expert_bytes == 0 || r->live_step < 0;
}

sy_status sy_replica_exchange(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas) {
    settle(r);
    if (nothing_to_send(r, comm, replicas)) return SY_OK;
    if (replicas > sy_comm_world(comm) - 1) replicas = sy_comm_world(comm) - 1;
    const bool delta = can_delta(r, placement, replicas);
    if (delta) SY_CHECK(take_grads(r));
    stage *sg = &r->stages[older_stage(r)];
    SY_CHECK(stage_take(r, sg));
    slot *s = &r->slots[delta ? 1 - r->chain_slot : older_slot(r)];
    return exchange_from(r, comm, placement, replicas, sg, s, false, delta);
}

/* ---- the overlapped exchange ------------------------------------------------------------- */

/* After an exchange in the idle class that training waited for longer than this share of the
 * interval between posts, this many exchanges run in the normal class before the next try. */
#define SY_REPLICA_BG_LATE 0.05
#define SY_REPLICA_BG_BACKOFF 8

/* Background scheduling off for good after an error (mu held): every thread it may have moved
 * back to the normal class, as far as that still works. */
static void bg_fail(sy_replica_t *r, const char *what, int e) {
    sy_warn("replicas: %s: %s; the exchanges run in the normal scheduling class from now on", what,
            e ? strerror(e) : sy_err_msg());
    r->bg_on = false;
    r->bg_low = false;
    (void)sy_dataplane_set_background(r->bg_dp, 0);
    if (r->th_tid) (void)sy_bg_set(r->th_tid, false);
}

/* The module's thread to the idle class or back, while the exchange is in the background (mu
 * held). */
static void bg_thread(sy_replica_t *r, bool idle) {
    if (!r->bg_on || !r->bg_low) return;
    int e = sy_bg_set(r->th_tid, idle);
    if (e) bg_fail(r, idle ? "the exchange thread to the idle class" : "the exchange thread to the normal class", e);
}

/* The caller is about to wait for the pending job: its threads back to the normal class, so that
 * no other load can starve them while training waits (mu held). */
static void bg_boost(sy_replica_t *r) {
    if (!r->bg_on || !r->bg_low) return;
    r->bg_low = false;
    if (sy_dataplane_set_background(r->bg_dp, 0) != SY_OK) return bg_fail(r, "data plane threads", 0);
    int e = r->th_tid ? sy_bg_set(r->th_tid, false) : 0;
    if (e) bg_fail(r, "the exchange thread to the normal class", e);
}

static void *exchange_main(void *arg) {
    sy_replica_t *r = arg;
    pthread_setname_np(pthread_self(), "sy-replica"); /* named for profilers and cluster.replica_cpus */
    pthread_mutex_lock(&r->mu);
    r->th_tid = sy_bg_self();
    if (r->pin_on) (void)sy_affinity_set(0, &r->pin_cpus); /* checked by the caller: see sy_replica_set_cpus */
    for (;;) {
        while (!r->th_quit && r->phase != JOB_COPY) pthread_cond_wait(&r->cv, &r->mu);
        if (r->th_quit) break;
        /* the copy runs in the normal class (the thread is in it between exchanges): the next
         * update waits for it, and it is short */
        pthread_mutex_unlock(&r->mu);
        stage *sg = &r->stages[r->job_stage];
        sy_status st = stage_take(r, sg);
        pthread_mutex_lock(&r->mu);
        r->phase = JOB_EXCHANGE;
        bg_thread(r, true); /* the exchange in the idle class, until training waits for it */
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        if (st == SY_OK)
            st = exchange_from(r, r->job_comm, r->job_place, r->job_replicas, sg, &r->slots[r->job_slot], true,
                               r->job_delta);
        pthread_mutex_lock(&r->mu);
        r->job_st = st;
        snprintf(r->job_err, sizeof r->job_err, "%s", st == SY_OK ? "" : sy_err_msg());
        r->phase = JOB_DONE;
        /* back to the normal class until the next exchange: the next post's copy starts at once */
        bg_thread(r, false);
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

sy_status sy_replica_post(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas) {
    SY_CHECK(sy_replica_wait(r));
    if (nothing_to_send(r, comm, replicas)) return SY_OK;
    if (replicas > sy_comm_world(comm) - 1) replicas = sy_comm_world(comm) - 1;
    const bool delta = can_delta(r, placement, replicas);
    if (delta) SY_CHECK(take_grads(r));
    if (!r->th_started) {
        if (pthread_create(&r->th, NULL, exchange_main, r) != 0)
            return sy_err_set(SY_EINTERNAL, "replicas: cannot start the exchange thread");
        r->th_started = true;
    }
    /* The older stage and slot are invalid from now on: neither is named in holdings until the
     * thread has written it whole. */
    /* a delta exchange's target is the slot its base is not in (two slots may name one step:
     * after a restore, an older generation's and the new one's) */
    const int sg = older_stage(r), sl = delta ? 1 - r->chain_slot : older_slot(r);
    r->stages[sg].step = -1;
    r->slots[sl].step = -1;
    pthread_mutex_lock(&r->mu);
    r->job_comm = comm;
    memcpy(r->job_place, placement, sizeof(uint32_t) * (size_t)r->E);
    r->job_replicas = replicas;
    r->job_stage = sg;
    r->job_slot = sl;
    r->job_delta = delta;
    r->job_st = SY_OK;
    r->phase = JOB_COPY;
    const double now = sy_mono_s();
    if (r->last_post_s > 0) r->post_interval_s = now - r->last_post_s;
    r->last_post_s = now;
    if (r->bg_on && r->bg_skip > 0) {
        r->bg_skip--;
    } else if (r->bg_on && !r->bg_low) {
        r->bg_low = true;
        if (sy_dataplane_set_background(r->bg_dp, 1) != SY_OK) bg_fail(r, "data plane threads to the idle class", 0);
    }
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return SY_OK;
}

void sy_replica_wait_copied(sy_replica_t *r) {
    double t0 = sy_mono_s();
    pthread_mutex_lock(&r->mu); /* the copy runs in the normal class: nothing to boost */
    while (r->phase == JOB_COPY) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    r->stats.wait_ms += (sy_mono_s() - t0) * 1e3;
}

sy_status sy_replica_wait(sy_replica_t *r) {
    double t0 = sy_mono_s();
    pthread_mutex_lock(&r->mu);
    const bool boosted = r->bg_low && (r->phase == JOB_COPY || r->phase == JOB_EXCHANGE);
    if (boosted) bg_boost(r);
    while (r->phase == JOB_COPY || r->phase == JOB_EXCHANGE) pthread_cond_wait(&r->cv, &r->mu);
    if (boosted && r->post_interval_s > 0 && sy_mono_s() - t0 > SY_REPLICA_BG_LATE * r->post_interval_s)
        r->bg_skip = SY_REPLICA_BG_BACKOFF;
    sy_status st = r->phase == JOB_DONE ? r->job_st : SY_OK;
    char err[sizeof r->job_err];
    snprintf(err, sizeof err, "%s", r->job_err);
    r->phase = JOB_NONE;
    r->job_comm = NULL;
    pthread_mutex_unlock(&r->mu);
    r->stats.wait_ms += (sy_mono_s() - t0) * 1e3;
    if (st != SY_OK) return sy_err_set(st, "replica exchange: %s", err);
    return SY_OK;
}

/* Ends a pending post (its error, if any, is dropped: the caller is past caring). */
static void settle(sy_replica_t *r) {
    if (!r->th_started) return;
    pthread_mutex_lock(&r->mu);
    bool pending = r->phase != JOB_NONE;
    pthread_mutex_unlock(&r->mu);
    if (pending) (void)sy_replica_wait(r);
}

/* ---- what is held ----------------------------------------------------------------------- */

int sy_replica_holdings(sy_replica_t *r, sy_replica_held *out) {
    settle(r);
    int n = 0;
    if (r->live_step >= 0) out[n++] = (sy_replica_held){r->live_step, true, r->live_owned};
    for (int k = 0; k < 2; k++) {
        const stage *sg = &r->stages[k];
        if (sg->step < 0) continue;
        /* a copy of the live state adds nothing to it */
        if (sg->step == r->live_step && !memcmp(sg->owned, r->live_owned, sizeof(bool) * (size_t)r->E)) continue;
        out[n++] = (sy_replica_held){sg->step, true, sg->owned};
    }
    for (int k = 0; k < 2; k++)
        if (r->slots[k].step >= 0) out[n++] = (sy_replica_held){r->slots[k].step, false, r->slots[k].have};
    return n;
}

/* Where this rank finds expert e of `step`: 'l' live, 'a'/'b' a stage, '0'/'1' a slot, 0
 * nowhere. */
static char find_expert(const sy_replica_t *r, int64_t step, int e) {
    if (r->live_step == step && r->live_owned[e]) return 'l';
    for (int k = 0; k < 2; k++)
        if (r->stages[k].step == step && r->stages[k].owned[e]) return (char)('a' + k);
    for (int k = 0; k < 2; k++)
        if (r->slots[k].step == step && r->slots[k].have[e]) return (char)('0' + k);
    return 0;
}

static void pack_from(sy_replica_t *r, char where, int e, char *dst) {
    if (where == 'l') pack_live(r, e, dst);
    else if (where == 'a' || where == 'b')
        memcpy(dst, r->stages[where - 'a'].buf + r->stages[where - 'a'].off[e], r->expert_bytes);
    else memcpy(dst, r->slots[where - '0'].buf + r->slots[where - '0'].off[e], r->expert_bytes);
}

/* ---- restore ---------------------------------------------------------------------------- */

sy_status sy_replica_restore(sy_replica_t *r, sy_comm_t *comm, int rank, int world, int64_t step, int dense_source,
                             const int32_t *expert_source, const uint32_t *placement, char *note, size_t note_cap) {
    settle(r);
    const int E = r->E;
    const size_t EB = r->expert_bytes, db = sizeof(float) * r->dense;
    if (world > 1 && !comm) return sy_err_set(SY_EINVAL, "replica restore: no data plane for world %d", world);
    /* 1. Check and stage everything this rank gives before anything is overwritten. */
    char dense_at = 0;
    if (rank == dense_source) {
        dense_at = r->live_step == step ? 'l' : r->stages[0].step == step ? 'a' : r->stages[1].step == step ? 'b' : 0;
        if (!dense_at)
            return sy_err_set(SY_EINVAL, "replica restore: asked for dense of step %lld, which this worker does not "
                              "hold (live %lld, copies %lld and %lld)", (long long)step, (long long)r->live_step,
                              (long long)r->stages[0].step, (long long)r->stages[1].step);
    }
    size_t sb[world > 0 ? world : 1], rb[world > 0 ? world : 1], soff[world > 0 ? world : 1];
    memset(sb, 0, sizeof sb);
    memset(rb, 0, sizeof rb);
    int keep_live = 0, local = 0, received = 0;
    char wh[E > 0 ? E : 1]; /* where this rank finds the experts it gives (find_expert) */
    for (int e = 0; e < E; e++) {
        int src = expert_source[e], dst = (int)placement[e];
        if (src < 0 || src >= world || dst < 0 || dst >= world)
            return sy_err_set(SY_EINVAL, "replica restore: expert %d from rank %d to rank %d in a world of %d", e, src,
                              dst, world);
        wh[e] = 0;
        if (EB == 0) { /* no Switch layer: experts have no state */
            wh[e] = 'l';
            continue;
        }
        if (src == rank) {
            char where = wh[e] = find_expert(r, step, e);
            if (!where)
                return sy_err_set(SY_EINVAL, "replica restore: asked for expert %d of step %lld, which this worker "
                                  "does not hold whole", e, (long long)step);
            if (dst != rank) sb[dst] += EB;
        } else if (dst == rank) {
            rb[src] += EB;
        }
    }
    size_t total_send = 0, total_recv = 0, local_bytes = 0;
    for (int q = 0; q < world; q++) soff[q] = total_send, total_send += sb[q], total_recv += rb[q];
    for (int e = 0; e < E; e++)
        if (expert_source[e] == rank && (int)placement[e] == rank && wh[e] != 'l') local_bytes += EB;
    /* one buffer: [dense p m v t | sends by rank | local copies | receives by rank] */
    const size_t dense_bytes = 3 * db + sizeof(int64_t);
    SY_CHECK(grow(&r->send, &r->send_cap, dense_bytes + total_send + local_bytes + total_recv + 1));
    char *dense_buf = r->send, *sends = dense_buf + dense_bytes, *locals = sends + total_send,
         *recvs = locals + local_bytes;
    if (dense_at) {
        int64_t t = dense_at == 'l' ? sy_adamw_t_count(r->opt) : r->stages[dense_at - 'a'].t;
        if (dense_at == 'l') download_dense(r, dense_buf);
        else memcpy(dense_buf, r->stages[dense_at - 'a'].buf, 3 * db);
        memcpy(dense_buf + 3 * db, &t, sizeof t);
    }
    size_t fill[world > 0 ? world : 1];
    memcpy(fill, soff, sizeof fill);
    size_t lo = 0;
    for (int e = 0; e < E; e++) {
        if (expert_source[e] != rank) continue;
        int dst = (int)placement[e];
        char where = wh[e];
        if (dst != rank) {
            pack_from(r, where, e, sends + fill[dst]);
            fill[dst] += EB;
        } else if (where == 'l') {
            keep_live++;
        } else {
            pack_from(r, where, e, locals + lo);
            lo += EB;
        }
    }
    /* 2. Exchange (the live state is untouched until both collectives are through). */
    if (world > 1) {
        SY_CHECK(sy_comm_broadcast(comm, dense_buf, dense_bytes, dense_source));
        SY_CHECK(sy_comm_alltoallv(comm, sends, sb, recvs, rb));
    }
    /* 3. Write: dense, local experts, received experts (each sender's experts ascending). */
    r->live_step = -1;
    r->be->upload(r->be, sy_model_params(r->model), dense_buf, db);
    r->be->upload(r->be, sy_adamw_m(r->opt), dense_buf + db, db);
    r->be->upload(r->be, sy_adamw_v(r->opt), dense_buf + 2 * db, db);
    int64_t t;
    memcpy(&t, dense_buf + 3 * db, sizeof t);
    sy_adamw_set_t_count(r->opt, t);
    lo = 0;
    size_t roff[world > 0 ? world : 1], at = 0;
    for (int q = 0; q < world; q++) roff[q] = at, at += rb[q];
    bool owned[E > 0 ? E : 1];
    for (int e = 0; e < E; e++) {
        owned[e] = (int)placement[e] == rank;
        if (!owned[e]) continue;
        int src = expert_source[e];
        if (src == rank) {
            if (wh[e] == 'l') continue; /* already in place */
            unpack_live(r, e, locals + lo);
            lo += EB;
            local++;
        } else {
            unpack_live(r, e, recvs + roff[src]);
            roff[src] += EB;
            received++;
        }
    }
    sy_model_weights_changed(r->model);
    sy_replica_set_live(r, step, owned);
    if (note)
        snprintf(note, note_cap, "from replicas: dense from rank %d, %d expert(s) kept, %d from this worker's copies, "
                 "%d received", dense_source, keep_live, local, received);
    return SY_OK;
}
