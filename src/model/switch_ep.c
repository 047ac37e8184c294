#include "model/switch_ep.h"

#include <stdlib.h>
#include <string.h>

#include "base/owners.h"
#include "switch_internal.h"

/* Owner-side state of one Switch layer for the current round. Host bookkeeping, except the
 * rows and the per-row keys, which are backend buffers. */
typedef struct {
    int n_rows;           /* rows received in all */
    float dropout;        /* expert dropout used in the forward (the backward applies its mask) */
    int32_t *recv_rows;   /* [world] rows received from each source */
    int32_t *src_cnt;     /* [n_mine, world] rows of each of my experts from each source */
    int32_t *src_row;     /* [n_mine, world] first wire row of each such chunk in the
                           * concatenated received rows */
    int32_t *off;         /* [n_mine+1] first local row of each of my experts */
    int32_t *tok, *micro; /* [R] host: token index and micro-batch of each local row */
    int32_t *tok_b, *micro_b;        /* [R] backend copies (the dropout mask's keys) */
    int64_t *routed;      /* [n_mine] tokens routed to each of my experts, before capacity, by
                           * every source since sy_ep_counts_reset (the step's per-expert counts) */
    float *xe, *he, *ge, *mask, *ye; /* backend [R, D] / [R, F] */
} served_layer;

struct sy_ep {
    sy_backend_t *be;
    sy_comm_t *comm;
    int rank, world, E, D, F, G, n_layers;
    int *q_off;           /* [world+1] each rank's experts: q_exp[q_off[q] .. q_off[q+1]) */
    int *q_exp;           /* [E] experts grouped by owner rank, ascending within a rank */
    const int *mine;      /* my experts (into q_exp) */
    int nm;
    int R;                /* max rows an owner can receive: world·G */
    served_layer *layers;
    size_t es;            /* bytes per row element on the wire: 2 (bf16 mode) or 4 (fp32) */
    /* exchange scratch. The wire buffers are backend buffers (send_b, recv_b: backend ops pack
     * and unpack rows there). A comm that reads host memory (tcp, threads) gets send and recv:
     * the backend's host view of them, or host staging buffers (staged true) copied by
     * download/upload. A comm that takes device buffers (nccl: dev_wire) gets send_b and recv_b
     * themselves; send and recv are then host mirrors (staged true) for what the host writes
     * (the counts) and reads (counts, token indices). */
    char *send_b, *recv_b;   /* backend, [cap] bytes each */
    char *send, *recv;       /* host, [cap] bytes each */
    bool staged, dev_wire;
    size_t *send_bytes, *recv_bytes;
    int32_t *recv_row0;   /* [world] first row (in concatenated received order) per source */
    float *dye;           /* backend [R, D] received output gradients, local expert-major order */
    float *dge, *dhe;     /* backend [R, F] */
    sy_ep_stats stats;
};

#define EP_ALLOC(ptr, n)                                                      \
    do {                                                                      \
        (ptr) = calloc((size_t)(n), sizeof(*(ptr)));                          \
        if (!(ptr)) goto oom;                                                 \
    } while (0)
/* a backend buffer of n elements (zeroed) */
#define EP_BALLOC(ptr, n)                                                     \
    do {                                                                      \
        (ptr) = be->alloc(be, (size_t)(n) * sizeof(*(ptr)));                  \
        if (!(ptr)) goto oom;                                                 \
    } while (0)
/* an activation buffer of n elements (bf16 storage in bf16 mode) */
#define EP_LPALLOC(ptr, n)                                                    \
    do {                                                                      \
        (ptr) = sy_alloc_act(be, (size_t)(n));                                \
        if (!(ptr)) goto oom;                                                 \
    } while (0)

sy_status sy_ep_new(sy_backend_t *be, sy_comm_t *comm, const uint32_t *owner, int E, int D,
                    int F, int G, int n_layers, sy_ep_t **out) {
    sy_ep_t *ep = calloc(1, sizeof *ep);
    if (!ep) return sy_err_set(SY_ENOMEM, "expert parallelism: out of memory");
    ep->be = be;
    ep->comm = comm;
    ep->es = be->bf16 ? sizeof(uint16_t) : sizeof(float);
    ep->rank = sy_comm_rank(comm);
    ep->world = sy_comm_world(comm);
    ep->E = E, ep->D = D, ep->F = F, ep->G = G, ep->n_layers = n_layers;
    const int W = ep->world;
    EP_ALLOC(ep->q_off, W + 1);
    EP_ALLOC(ep->q_exp, E);
    const int bad = sy_owners_group(owner, E, W, ep->q_off, ep->q_exp);
    if (bad >= 0) {
        const uint32_t q = owner[bad];
        sy_ep_destroy(&ep);
        return sy_err_set(SY_EINVAL, "expert placement: expert %d on rank %u of a world of %d", bad, q, W);
    }
    ep->mine = ep->q_exp + ep->q_off[ep->rank];
    ep->nm = ep->q_off[ep->rank + 1] - ep->q_off[ep->rank];
    ep->R = W * G;
    const int nm = ep->nm;
    EP_ALLOC(ep->layers, n_layers);
    for (int l = 0; l < n_layers; l++) {
        served_layer *s = &ep->layers[l];
        EP_ALLOC(s->off, nm + 1);
        EP_ALLOC(s->tok, ep->R);
        EP_ALLOC(s->micro, ep->R);
        EP_ALLOC(s->recv_rows, W);
        EP_ALLOC(s->src_cnt, (size_t)(nm > 0 ? nm : 1) * W);
        EP_ALLOC(s->src_row, (size_t)(nm > 0 ? nm : 1) * W);
        EP_ALLOC(s->routed, nm > 0 ? nm : 1);
        if (nm > 0) {
            EP_BALLOC(s->tok_b, ep->R);
            EP_BALLOC(s->micro_b, ep->R);
            EP_LPALLOC(s->xe, (size_t)ep->R * D);
            EP_LPALLOC(s->ye, (size_t)ep->R * D);
            EP_LPALLOC(s->he, (size_t)ep->R * F);
            EP_LPALLOC(s->ge, (size_t)ep->R * F);
            EP_BALLOC(s->mask, (size_t)ep->R * F);
        }
    }
    /* Wire buffers: the largest exchange either way is the counts (2 int32 an expert per rank),
     * or ≤ R rows with their tokens (an owner receives, and returns, at most R = W·G rows). */
    size_t cap = 2 * sizeof(int32_t) * (size_t)W * E + (sizeof(int32_t) + sizeof(float) * (size_t)D) * ep->R;
    EP_BALLOC(ep->send_b, cap);
    EP_BALLOC(ep->recv_b, cap);
    ep->dev_wire = sy_comm_device_buffers(comm) != 0;
    ep->send = ep->dev_wire ? NULL : be->host_view(be, ep->send_b);
    ep->recv = ep->dev_wire ? NULL : be->host_view(be, ep->recv_b);
    if (!ep->send || !ep->recv) {
        ep->staged = true;
        ep->send = ep->recv = NULL;
        EP_ALLOC(ep->send, cap);
        EP_ALLOC(ep->recv, cap);
    }
    EP_ALLOC(ep->send_bytes, W);
    EP_ALLOC(ep->recv_bytes, W);
    EP_ALLOC(ep->recv_row0, W);
    EP_LPALLOC(ep->dye, (size_t)ep->R * D);
    if (nm > 0) {
        EP_LPALLOC(ep->dge, (size_t)ep->R * F);
        EP_LPALLOC(ep->dhe, (size_t)ep->R * F);
    }
    *out = ep;
    return SY_OK;
oom:
    sy_ep_destroy(&ep);
    return sy_err_set(SY_ENOMEM, "expert parallelism: out of memory (world %d, G %d)", W, G);
}

void sy_ep_destroy(sy_ep_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_ep_t *ep = *self_p;
    sy_backend_t *be = ep->be;
    if (ep->layers)
        for (int l = 0; l < ep->n_layers; l++) {
            served_layer *s = &ep->layers[l];
            free(s->off), free(s->tok), free(s->micro), free(s->src_row), free(s->recv_rows),
                free(s->src_cnt), free(s->routed);
            void *b[] = {s->tok_b, s->micro_b, s->xe, s->ye, s->he, s->ge, s->mask};
            for (size_t i = 0; i < sizeof b / sizeof b[0]; i++)
                if (b[i]) be->free(be, b[i]);
        }
    free(ep->layers), free(ep->q_off), free(ep->q_exp);
    if (ep->staged) free(ep->send), free(ep->recv);
    void *b[] = {ep->send_b, ep->recv_b, ep->dye, ep->dge, ep->dhe};
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++)
        if (b[i]) be->free(be, b[i]);
    free(ep->send_bytes), free(ep->recv_bytes);
    free(ep->recv_row0);
    free(ep);
    *self_p = NULL;
}

int sy_ep_n_owned(const sy_ep_t *ep) { return ep->nm; }
const int *sy_ep_owned(const sy_ep_t *ep) { return ep->mine; }

sy_ep_stats sy_ep_get_stats(const sy_ep_t *ep) { return ep->stats; }

void sy_ep_counts_reset(sy_ep_t *ep) {
    for (int l = 0; l < ep->n_layers; l++) memset(ep->layers[l].routed, 0, sizeof(int64_t) * (size_t)(ep->nm > 0 ? ep->nm : 1));
}

void sy_ep_counts(const sy_ep_t *ep, int32_t *out) {
    for (int l = 0; l < ep->n_layers; l++)
        for (int i = 0; i < ep->nm; i++) out[(size_t)l * ep->nm + i] = (int32_t)ep->layers[l].routed[i];
}

/* Bytes of one side of an exchange (the segments lie back to back from the buffer's start). */
static size_t total_bytes(const sy_ep_t *ep, const size_t *bytes) {
    size_t n = 0;
    for (int q = 0; q < ep->world; q++) n += bytes[q];
    return n;
}

/* One all-to-all of the exchange, counting what leaves this rank (our own chunk stays).
 * packed: the send bytes were written by backend ops into send_b (else by the host into
 * send); the received bytes are in recv for the host and recv_b for backend ops. */
static sy_status exchange(sy_ep_t *ep, uint64_t *counter, bool packed) {
    sy_backend_t *be = ep->be;
    for (int q = 0; q < ep->world; q++)
        if (q != ep->rank) *counter += ep->send_bytes[q];
    if (ep->dev_wire) {
        /* the comm moves backend buffers: the host-written counts go up first, and everything
         * received comes down to the host mirror (the host reads counts and token indices) */
        if (!packed) be->upload(be, ep->send_b, ep->send, total_bytes(ep, ep->send_bytes));
        be->sync(be);
        SY_CHECK(sy_comm_alltoallv(ep->comm, ep->send_b, ep->send_bytes, ep->recv_b, ep->recv_bytes));
        be->download(be, ep->recv, ep->recv_b, total_bytes(ep, ep->recv_bytes));
        return SY_OK;
    }
    if (ep->staged && packed)
        be->download(be, ep->send, ep->send_b, total_bytes(ep, ep->send_bytes));
    else
        be->sync(be);
    SY_CHECK(sy_comm_alltoallv(ep->comm, ep->send, ep->send_bytes, ep->recv, ep->recv_bytes));
    if (ep->staged) be->upload(be, ep->recv_b, ep->recv, total_bytes(ep, ep->recv_bytes));
    return SY_OK;
}

/* Rows this rank routed to owner q's experts (0 without a micro-batch). */
static int rows_to(const sy_ep_t *ep, const sy_switch_t *sw, int q) {
    if (!sw) return 0;
    int n = 0;
    for (int k = ep->q_off[q]; k < ep->q_off[q + 1]; k++) n += sw->h_kept[ep->q_exp[k]];
    return n;
}

/* n row elements onto the wire at p (a backend buffer): bf16 in bf16 mode (RNE; exact, since
 * these values are bf16-rounded already, model spec §4), else fp32. Returns the bytes written. */
static size_t put_rows(const sy_ep_t *ep, char *p, const float *x, size_t n) {
    ep->be->wire_put(ep->be, p, x, n, (int)ep->es);
    return ep->es * n;
}

static void get_rows(const sy_ep_t *ep, float *x, const char *p, size_t n) {
    ep->be->wire_get(ep->be, x, p, n, (int)ep->es);
}

/* Packs rows (expert-major dispatch order in `rows`, [G, D]) for each owner, in the owner's
 * expert order, into ep->send_b; with_tokens puts each row's token index first. */
static void pack_rows(sy_ep_t *ep, const sy_switch_t *sw, const float *rows, bool with_tokens) {
    const int D = ep->D;
    char *p = ep->send_b;
    for (int q = 0; q < ep->world; q++) {
        char *start = p;
        int nq = ep->q_off[q + 1] - ep->q_off[q];
        if (sw && nq > 0) {
            const int *ex = ep->q_exp + ep->q_off[q];
            if (with_tokens)
                for (int k = 0; k < nq; k++) {
                    size_t n = (size_t)sw->h_kept[ex[k]];
                    if (n) ep->be->copy(ep->be, p, sw->order + sw->h_offsets[ex[k]], sizeof(int32_t) * n);
                    p += sizeof(int32_t) * n;
                }
            for (int k = 0; k < nq; k++)
                p += put_rows(ep, p, rows + (size_t)sw->h_offsets[ex[k]] * D, (size_t)sw->h_kept[ex[k]] * D);
        }
        ep->send_bytes[q] = (size_t)(p - start);
    }
}

/* Wire bytes of n rows (and their tokens). */
static size_t row_bytes(const sy_ep_t *ep, int n, bool with_tokens) {
    return (size_t)n * (ep->es * (size_t)ep->D + (with_tokens ? sizeof(int32_t) : 0));
}

/* Expects from every owner q the rows this rank sent it (rows_to), as rows_to tells. */
static void expect_returned_rows(sy_ep_t *ep, const sy_switch_t *sw) {
    for (int q = 0; q < ep->world; q++) ep->recv_bytes[q] = row_bytes(ep, rows_to(ep, sw, q), false);
}

/* Scatters rows returned by the owners (each in its expert order, in ep->recv_b) into dispatch
 * order. */
static void unpack_rows(sy_ep_t *ep, const sy_switch_t *sw, float *rows) {
    if (!sw) return;
    const int D = ep->D;
    const char *in = ep->recv_b;
    for (int q = 0; q < ep->world; q++)
        for (int k = ep->q_off[q]; k < ep->q_off[q + 1]; k++) {
            int e = ep->q_exp[k];
            size_t n = (size_t)sw->h_kept[e] * D;
            get_rows(ep, rows + (size_t)sw->h_offsets[e] * D, in, n);
            in += ep->es * n;
        }
}

/* Owner side: the rows of the served layer (local order, [n_rows, D]) back to their sources,
 * each source's rows in the order it sent them: chunk (expert i, source src) goes to wire rows
 * src_row[i, src].. */
static sy_status return_rows(sy_ep_t *ep, const served_layer *s, const float *rows, const sy_switch_t *sw) {
    const int W = ep->world, D = ep->D;
    for (int i = 0; i < ep->nm; i++) {
        int r = s->off[i];
        for (int src = 0; src < W; src++) {
            const int n = s->src_cnt[i * W + src];
            if (n) put_rows(ep, ep->send_b + (size_t)s->src_row[i * W + src] * D * ep->es,
                            rows + (size_t)r * D, (size_t)n * D);
            r += n;
        }
    }
    for (int src = 0; src < W; src++) ep->send_bytes[src] = row_bytes(ep, s->recv_rows[src], false);
    expect_returned_rows(ep, sw);
    return exchange(ep, &ep->stats.row_bytes, true);
}

sy_status sy_ep_forward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex,
                        double dropout, sy_switch_key key) {
    const int W = ep->world, D = ep->D, F = ep->F, nm = ep->nm;
    served_layer *s = &ep->layers[sl];
    if (sw) sw->dropout = (float)dropout;

    /* 1. Counts: to each owner, for each of its experts, the rows that come (kept after
     * capacity) and the tokens routed to it before capacity (zeros without a micro-batch); from
     * each source, two counts per expert of mine. Fixed sizes. The routed counts add up to the
     * step's per-expert counts at their owner (sy_ep_counts). */
    {
        int32_t *p = (int32_t *)(void *)ep->send;
        for (int q = 0; q < W; q++) {
            int nq = ep->q_off[q + 1] - ep->q_off[q];
            for (int k = 0; k < nq; k++) {
                const int e = ep->q_exp[ep->q_off[q] + k];
                *p++ = sw ? sw->h_kept[e] : 0;
                *p++ = sw ? sw->h_counts[e] : 0;
            }
            ep->send_bytes[q] = 2 * sizeof(int32_t) * (size_t)nq;
            ep->recv_bytes[q] = 2 * sizeof(int32_t) * (size_t)nm;
        }
    }
    SY_CHECK(exchange(ep, &ep->stats.meta_bytes, false));
    int32_t counts[W][nm > 0 ? nm : 1];
    int total = 0;
    for (int src = 0; src < W; src++) {
        const int32_t *p = (const int32_t *)(const void *)(ep->recv + 2 * sizeof(int32_t) * (size_t)nm * src);
        int n = 0;
        for (int i = 0; i < nm; i++) {
            const int32_t kept = p[2 * i], routed = p[2 * i + 1];
            if (routed < 0 || routed > ep->G || kept < 0 || kept > routed)
                return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent bad counts for expert %d (%d rows of %d routed, at most %d)",
                                  src, ep->mine[i], kept, routed, ep->G);
            counts[src][i] = kept;
            n += kept;
        }
        for (int i = 0; i < nm; i++) s->routed[i] += p[2 * i + 1];
        s->recv_rows[src] = n;
        ep->recv_row0[src] = total;
        total += n;
    }
    if (total > ep->R) return sy_err_set(SY_EREMOTE, "expert exchange: %d rows announced, at most %d fit", total, ep->R);
    s->n_rows = total;
    s->dropout = (float)dropout;

    /* 2. Tokens and rows, sizes known from the counts: int32 token of each row, then the rows. */
    pack_rows(ep, sw, sw ? sw->xe : NULL, true);
    for (int src = 0; src < W; src++) ep->recv_bytes[src] = row_bytes(ep, s->recv_rows[src], true);
    SY_CHECK(exchange(ep, &ep->stats.row_bytes, true));
    for (int q = 0; q < W; q++) /* the token indices are bookkeeping, not rows */
        if (q != ep->rank) {
            ep->stats.row_bytes -= sizeof(int32_t) * (size_t)rows_to(ep, sw, q);
            ep->stats.meta_bytes += sizeof(int32_t) * (size_t)rows_to(ep, sw, q);
        }
    const char *toks[W], *rows[W]; /* host, resp. backend */
    {
        size_t p = 0;
        for (int src = 0; src < W; src++) {
            toks[src] = ep->recv + p;
            rows[src] = ep->recv_b + p + sizeof(int32_t) * (size_t)s->recv_rows[src];
            p += ep->recv_bytes[src];
        }
    }

    /* Local expert-major order: expert i's rows from source 0, then 1, ... */
    int li = 0;
    for (int i = 0; i < nm; i++) {
        s->off[i] = li;
        for (int src = 0; src < W; src++) {
            s->src_cnt[i * W + src] = counts[src][i];
            int before = 0;
            for (int k = 0; k < i; k++) before += counts[src][k];
            const int n = counts[src][i];
            s->src_row[i * W + src] = ep->recv_row0[src] + before;
            if (n) get_rows(ep, s->xe + (size_t)li * D, rows[src] + (size_t)before * D * ep->es, (size_t)n * D);
            memcpy(&s->tok[li], toks[src] + sizeof(int32_t) * (size_t)before, sizeof(int32_t) * (size_t)n);
            for (int r = 0; r < n; r++, li++) {
                if (s->tok[li] < 0 || s->tok[li] >= ep->G)
                    return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent token index %d", src, s->tok[li]);
                s->micro[li] = key.micro + src;
            }
        }
    }
    s->off[nm] = li;
    if (li > 0) { /* the dropout mask's keys */
        ep->be->upload(ep->be, s->tok_b, s->tok, sizeof(int32_t) * (size_t)li);
        ep->be->upload(ep->be, s->micro_b, s->micro, sizeof(int32_t) * (size_t)li);
    }

    /* One chunk per (expert, source): the GEMM shapes of the single-process layer. */
    if (nm > 0) {
        sy_expert_rows c[nm * W];
        for (int i = 0; i < nm; i++) {
            int r0 = s->off[i];
            for (int src = 0; src < W; src++) {
                const int n = s->src_cnt[i * W + src];
                c[i * W + src] = (sy_expert_rows){
                    .w = &ex[ep->mine[i]], .n = n, .xe = s->xe + (size_t)r0 * D,
                    .he = s->he + (size_t)r0 * F, .ge = s->ge + (size_t)r0 * F,
                    .mask = s->mask + (size_t)r0 * F, .ye = s->ye + (size_t)r0 * D,
                    .tok = s->tok_b + r0, .micro = s->micro_b + r0};
                r0 += n;
            }
        }
        sy_experts_fwd(ep->be, c, nm * W, D, F, dropout, key);
    }

    /* 3. Reply: outputs back to each source in the order it sent them. */
    SY_CHECK(return_rows(ep, s, s->ye, sw));
    unpack_rows(ep, sw, sw ? sw->ye : NULL);
    return SY_OK;
}

sy_status sy_ep_backward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex) {
    const int W = ep->world, D = ep->D, F = ep->F, nm = ep->nm;
    served_layer *s = &ep->layers[sl];
    /* Output gradients (g·dy) to the owners, in each owner's expert order; every size is known
     * from the forward's counts. */
    pack_rows(ep, sw, sw ? sw->dye : NULL, false);
    for (int src = 0; src < W; src++) ep->recv_bytes[src] = row_bytes(ep, s->recv_rows[src], false);
    SY_CHECK(exchange(ep, &ep->stats.row_bytes, true));
    /* Into local expert-major order, backward, and back. */
    float *dye = ep->dye;
    for (int i = 0; i < nm; i++) {
        int r = s->off[i];
        for (int src = 0; src < W; src++) {
            const int n = s->src_cnt[i * W + src];
            if (n) get_rows(ep, dye + (size_t)r * D, ep->recv_b + (size_t)s->src_row[i * W + src] * D * ep->es,
                            (size_t)n * D);
            r += n;
        }
    }
    /* One chunk per (expert, source): with fp64 accumulators, the same accumulation sequence
     * (micro-batch order) as the single-process layer: one grouped call per source, sources in
     * order, so each expert adds source 0, then 1, ... dxe goes into ye's slot. */
    if (nm > 0) {
        sy_expert_grad_rows c[nm];
        int r0[nm];
        for (int i = 0; i < nm; i++) r0[i] = s->off[i];
        for (int src = 0; src < W; src++) {
            for (int i = 0; i < nm; i++) {
                const int n = s->src_cnt[i * W + src];
                const size_t r = (size_t)r0[i];
                c[i] = (sy_expert_grad_rows){
                    .w = &ex[ep->mine[i]], .n = n, .dye = dye + r * D, .xe = s->xe + r * D,
                    .he = s->he + r * F, .ge = s->ge + r * F,
                    .mask = s->dropout > 0.0f ? s->mask + r * F : NULL, .dge = ep->dge + r * F,
                    .dhe = ep->dhe + r * F, .dxe = s->ye + r * D};
                r0[i] += n;
            }
            sy_experts_bwd(ep->be, c, nm, D, F);
        }
    }
    SY_CHECK(return_rows(ep, s, s->ye, sw));
    unpack_rows(ep, sw, sw ? sw->dxe : NULL);
    return SY_OK;
}
