/* Peer replicas of expert state: see replica.h. */
#include "worker/replica.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/clock.h"
#include "base/log.h"

/* One expert's state in a replica, a piece or a restore message: for each of its tensors in
 * parameter-table order, weights then first moment then second moment (fp32). */
typedef struct {
    int64_t step; /* -1: invalid (empty, or being received) */
    bool *have;   /* [E] */
    size_t *off;  /* [E] byte offset of expert e in buf */
    char *buf;
    size_t cap;
} slot;

struct sy_replica {
    sy_model_t *model;
    sy_adamw_t *opt;
    sy_backend_t *be;
    int E;
    size_t numel, dense;
    size_t expert_bytes;  /* one expert's state (all experts have the same shapes) */
    int64_t live_step;
    bool *live_owned;     /* [E] */
    /* prev: host copy of dense + prev_owned experts after step prev_step */
    int64_t prev_step;
    int64_t prev_t;
    bool *prev_owned;
    float *prev_p, *prev_m, *prev_v; /* [numel] (only dense and prev_owned parts written) */
    slot slots[2];
    bool held_dense[SY_REPLICA_MAX_HELD];
    char *send;           /* staging of an exchange or restore */
    size_t send_cap;
    sy_replica_piece_fn piece_fn;
    void *piece_ctx;
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
    int E = r->E > 0 ? r->E : 1;
    r->live_owned = calloc((size_t)E, sizeof(bool));
    r->prev_owned = calloc((size_t)E, sizeof(bool));
    bool ok = r->live_owned && r->prev_owned;
    for (int k = 0; k < 2; k++) {
        r->slots[k].step = -1;
        r->slots[k].have = calloc((size_t)E, sizeof(bool));
        r->slots[k].off = calloc((size_t)E, sizeof(size_t));
        ok = ok && r->slots[k].have && r->slots[k].off;
    }
    r->live_step = r->prev_step = -1;
    if (!ok) {
        sy_replica_destroy(&r);
        return sy_err_set(SY_ENOMEM, "replicas: out of memory");
    }
    *out = r;
    return SY_OK;
}

void sy_replica_destroy(sy_replica_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_replica_t *r = *self_p;
    free(r->live_owned), free(r->prev_owned);
    free(r->prev_p), free(r->prev_m), free(r->prev_v);
    for (int k = 0; k < 2; k++) free(r->slots[k].have), free(r->slots[k].off), free(r->slots[k].buf);
    free(r->send);
    free(r);
    *self_p = NULL;
}

void sy_replica_set_live(sy_replica_t *r, int64_t step, const bool *owned) {
    r->live_step = step;
    if (owned) memcpy(r->live_owned, owned, sizeof(bool) * (size_t)r->E);
}

int64_t sy_replica_live_step(const sy_replica_t *r) { return r->live_step; }

void sy_replica_forget(sy_replica_t *r) {
    r->live_step = r->prev_step = -1;
    r->slots[0].step = r->slots[1].step = -1;
}

void sy_replica_set_piece_hook(sy_replica_t *r, sy_replica_piece_fn fn, void *ctx) {
    r->piece_fn = fn;
    r->piece_ctx = ctx;
}

sy_replica_stats sy_replica_get_stats(const sy_replica_t *r) { return r->stats; }

/* ---- moving one expert's state ---------------------------------------------------------- */

/* Live buffers (backend) of expert e -> host dst (expert_bytes). */
static void pack_live(sy_replica_t *r, int e, char *dst) {
    float *P = sy_model_params(r->model), *M = sy_adamw_m(r->opt), *V = sy_adamw_v(r->opt);
    for (int i = 0; i < sy_model_n_params(r->model); i++) {
        const sy_param_t *p = sy_model_param(r->model, i);
        if (p->expert != e) continue;
        size_t b = sizeof(float) * p->numel;
        r->be->download(r->be, dst, P + p->offset, b), dst += b;
        r->be->download(r->be, dst, M + p->offset, b), dst += b;
        r->be->download(r->be, dst, V + p->offset, b), dst += b;
    }
}

/* prev (host) of expert e -> host dst. */
static void pack_prev(sy_replica_t *r, int e, char *dst) {
    for (int i = 0; i < sy_model_n_params(r->model); i++) {
        const sy_param_t *p = sy_model_param(r->model, i);
        if (p->expert != e) continue;
        size_t b = sizeof(float) * p->numel;
        memcpy(dst, r->prev_p + p->offset, b), dst += b;
        memcpy(dst, r->prev_m + p->offset, b), dst += b;
        memcpy(dst, r->prev_v + p->offset, b), dst += b;
    }
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

/* ---- prev ------------------------------------------------------------------------------- */

sy_status sy_replica_keep(sy_replica_t *r) {
    double t0 = sy_mono_s();
    if (!r->prev_p) {
        /* full-size buffers; only dense and the owned experts' pages are ever touched */
        r->prev_p = malloc(sizeof(float) * r->numel);
        r->prev_m = malloc(sizeof(float) * r->numel);
        r->prev_v = malloc(sizeof(float) * r->numel);
        if (!r->prev_p || !r->prev_m || !r->prev_v) {
            free(r->prev_p), free(r->prev_m), free(r->prev_v);
            r->prev_p = r->prev_m = r->prev_v = NULL;
            return sy_err_set(SY_ENOMEM, "replicas: no memory for the copy of the previous step");
        }
    }
    r->prev_step = -1;
    if (r->live_step < 0) return SY_OK;
    float *P = sy_model_params(r->model), *M = sy_adamw_m(r->opt), *V = sy_adamw_v(r->opt);
    for (int i = 0; i < sy_model_n_params(r->model); i++) {
        const sy_param_t *p = sy_model_param(r->model, i);
        if (p->expert >= 0 && !r->live_owned[p->expert]) continue;
        size_t b = sizeof(float) * p->numel;
        r->be->download(r->be, r->prev_p + p->offset, P + p->offset, b);
        r->be->download(r->be, r->prev_m + p->offset, M + p->offset, b);
        r->be->download(r->be, r->prev_v + p->offset, V + p->offset, b);
    }
    memcpy(r->prev_owned, r->live_owned, sizeof(bool) * (size_t)r->E);
    r->prev_t = sy_adamw_t_count(r->opt);
    r->prev_step = r->live_step;
    r->stats.keep_ms += (sy_mono_s() - t0) * 1e3;
    return SY_OK;
}

/* ---- the exchange after a step --------------------------------------------------------- */

static int owned_by(const uint32_t *placement, int E, int rank) {
    int n = 0;
    for (int e = 0; e < E; e++) n += (int)placement[e] == rank;
    return n;
}

sy_status sy_replica_exchange(sy_replica_t *r, sy_comm_t *comm, const uint32_t *placement, int replicas) {
    const int W = comm ? sy_comm_world(comm) : 1, rank = comm ? sy_comm_rank(comm) : 0, E = r->E;
    if (replicas > W - 1) replicas = W - 1;
    if (replicas <= 0 || r->expert_bytes == 0 || r->live_step < 0) return SY_OK;
    double t0 = sy_mono_s();
    /* rounds: the same on every rank (from the largest owner's share), so collectives pair up */
    size_t most = 0;
    for (int q = 0; q < W; q++) {
        size_t b = (size_t)owned_by(placement, E, q) * r->expert_bytes;
        if (b > most) most = b;
    }
    const int rounds = (int)((most + SY_REPLICA_PIECE_BYTES - 1) / SY_REPLICA_PIECE_BYTES);
    /* what we send: our live experts, ascending */
    const size_t mine = (size_t)owned_by(placement, E, rank) * r->expert_bytes;
    SY_CHECK(grow(&r->send, &r->send_cap, mine ? mine : 1));
    size_t o = 0;
    for (int e = 0; e < E; e++)
        if ((int)placement[e] == rank) pack_live(r, e, r->send + o), o += r->expert_bytes;
    /* what we receive: buddy j's sender is rank - j; its experts ascending, senders by j */
    slot *s = &r->slots[r->slots[0].step <= r->slots[1].step ? 0 : 1];
    s->step = -1; /* invalid until every piece is in */
    size_t need = 0;
    for (int j = 1; j <= replicas; j++) need += (size_t)owned_by(placement, E, (rank - j + W) % W) * r->expert_bytes;
    SY_CHECK(grow(&s->buf, &s->cap, need ? need : 1));
    memset(s->have, 0, sizeof(bool) * (size_t)E);
    size_t base = 0;
    size_t sb[W], rb[W];
    for (int j = 1; j <= replicas; j++) {
        const int to = (rank + j) % W, from = (rank - j + W) % W;
        const size_t theirs = (size_t)owned_by(placement, E, from) * r->expert_bytes;
        for (int k = 0; k < rounds; k++) {
            size_t at = (size_t)k * SY_REPLICA_PIECE_BYTES;
            memset(sb, 0, sizeof sb);
            memset(rb, 0, sizeof rb);
            sb[to] = at < mine ? (mine - at < SY_REPLICA_PIECE_BYTES ? mine - at : SY_REPLICA_PIECE_BYTES) : 0;
            rb[from] = at < theirs ? (theirs - at < SY_REPLICA_PIECE_BYTES ? theirs - at : SY_REPLICA_PIECE_BYTES) : 0;
            /* send/recv point at the piece: the chunks of the other ranks are empty */
            SY_CHECK(sy_comm_alltoallv(comm, r->send + (sb[to] ? at : 0), sb, s->buf + base + (rb[from] ? at : 0), rb));
            if (r->piece_fn) r->piece_fn(r->piece_ctx, r->live_step, k, rounds);
        }
        size_t eo = base;
        for (int e = 0; e < E; e++)
            if ((int)placement[e] == from) s->have[e] = true, s->off[e] = eo, eo += r->expert_bytes;
        base += theirs;
        r->stats.bytes_sent += mine;
        r->stats.bytes_received += theirs;
    }
    s->step = r->live_step;
    r->stats.exchanges++;
    r->stats.exchange_ms += (sy_mono_s() - t0) * 1e3;
    return SY_OK;
}

/* ---- what is held ----------------------------------------------------------------------- */

int sy_replica_holdings(sy_replica_t *r, sy_replica_held *out) {
    int n = 0;
    if (r->live_step >= 0) out[n++] = (sy_replica_held){r->live_step, true, r->live_owned};
    if (r->prev_step >= 0) out[n++] = (sy_replica_held){r->prev_step, true, r->prev_owned};
    for (int k = 0; k < 2; k++)
        if (r->slots[k].step >= 0) out[n++] = (sy_replica_held){r->slots[k].step, false, r->slots[k].have};
    return n;
}

/* Where this rank finds expert e of `step`: 'l' live, 'p' prev, '0'/'1' a slot, 0 nowhere. */
static char find_expert(const sy_replica_t *r, int64_t step, int e) {
    if (r->live_step == step && r->live_owned[e]) return 'l';
    if (r->prev_step == step && r->prev_owned[e]) return 'p';
    for (int k = 0; k < 2; k++)
        if (r->slots[k].step == step && r->slots[k].have[e]) return (char)('0' + k);
    return 0;
}

static void pack_from(sy_replica_t *r, char where, int e, char *dst) {
    if (where == 'l') pack_live(r, e, dst);
    else if (where == 'p') pack_prev(r, e, dst);
    else memcpy(dst, r->slots[where - '0'].buf + r->slots[where - '0'].off[e], r->expert_bytes);
}

/* ---- restore ---------------------------------------------------------------------------- */

sy_status sy_replica_restore(sy_replica_t *r, sy_comm_t *comm, int rank, int world, int64_t step, int dense_source,
                             const int32_t *expert_source, const uint32_t *placement, char *note, size_t note_cap) {
    const int E = r->E;
    const size_t EB = r->expert_bytes, db = sizeof(float) * r->dense;
    if (world > 1 && !comm) return sy_err_set(SY_EINVAL, "replica restore: no data plane for world %d", world);
    /* 1. Check and stage everything this rank gives before anything is overwritten. */
    char dense_at = 0;
    if (rank == dense_source) {
        dense_at = r->live_step == step ? 'l' : r->prev_step == step ? 'p' : 0;
        if (!dense_at)
            return sy_err_set(SY_EINVAL, "replica restore: asked for dense of step %lld, which this worker does not "
                              "hold (live %lld, previous %lld)", (long long)step, (long long)r->live_step,
                              (long long)r->prev_step);
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
        int64_t t = dense_at == 'l' ? sy_adamw_t_count(r->opt) : r->prev_t;
        if (dense_at == 'l') {
            r->be->download(r->be, dense_buf, sy_model_params(r->model), db);
            r->be->download(r->be, dense_buf + db, sy_adamw_m(r->opt), db);
            r->be->download(r->be, dense_buf + 2 * db, sy_adamw_v(r->opt), db);
        } else {
            memcpy(dense_buf, r->prev_p, db);
            memcpy(dense_buf + db, r->prev_m, db);
            memcpy(dense_buf + 2 * db, r->prev_v, db);
        }
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
