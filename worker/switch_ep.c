#include "switch_ep.h"

#include <stdlib.h>
#include <string.h>

#include "switch_internal.h"

/* Owner-side state of one Switch layer for the current round. */
typedef struct {
    int n_rows;           /* rows received in all */
    float dropout;        /* expert dropout used in the forward (the backward applies its mask) */
    int32_t *recv_rows;   /* [world] rows received from each source */
    int32_t *src_cnt;     /* [n_mine, world] rows of each of my experts from each source */
    int32_t *off;         /* [n_mine+1] first local row of each of my experts */
    int32_t *tok, *micro; /* [R] token index and micro-batch of each local row */
    int32_t *src_row;     /* [R] index of the local row in the concatenated received rows */
    float *xe, *he, *ge, *mask, *ye; /* [R, D] / [R, F] */
} served_layer;

struct sy_ep {
    sy_backend_t *be;
    sy_comm_t *comm;
    int rank, world, E, D, F, G, n_layers;
    uint32_t *owner;
    int e0, e1;           /* my experts [e0, e1) */
    int *q_e0, *q_e1;     /* each rank's range */
    int R;                /* max rows an owner can receive: world·G */
    served_layer *layers;
    /* exchange scratch */
    char *send, *recv;
    size_t send_cap, recv_cap;
    size_t *send_bytes, *recv_bytes;
    int32_t *recv_row0;   /* [world] first row (in concatenated received order) per source */
    float *rows_in;       /* [R, D] received rows, concatenated in source order */
    float *rows_out;      /* [R, D] */
    float *dge, *dhe;     /* [R, F] */
};

#define EP_ALLOC(ptr, n)                                                      \
    do {                                                                      \
        (ptr) = calloc((size_t)(n), sizeof(*(ptr)));                          \
        if (!(ptr)) goto oom;                                                 \
    } while (0)

sy_status sy_ep_new(sy_backend_t *be, sy_comm_t *comm, const uint32_t *owner, int E, int D,
                    int F, int G, int n_layers, sy_ep_t **out) {
    sy_ep_t *ep = calloc(1, sizeof *ep);
    if (!ep) return sy_err_set(SY_ENOMEM, "expert parallelism: out of memory");
    ep->be = be;
    ep->comm = comm;
    ep->rank = sy_comm_rank(comm);
    ep->world = sy_comm_world(comm);
    ep->E = E, ep->D = D, ep->F = F, ep->G = G, ep->n_layers = n_layers;
    const int W = ep->world;
    EP_ALLOC(ep->owner, E);
    EP_ALLOC(ep->q_e0, W);
    EP_ALLOC(ep->q_e1, W);
    for (int q = 0; q < W; q++) ep->q_e0[q] = E, ep->q_e1[q] = 0;
    for (int e = 0; e < E; e++) {
        int q = (int)owner[e];
        if (q < 0 || q >= W || (e > 0 && owner[e] < owner[e - 1])) {
            sy_ep_destroy(&ep);
            return sy_err_set(SY_EINVAL, "expert placement: expert %d on rank %d: owners must be "
                              "ascending contiguous ranges of ranks 0..%d", e, q, W - 1);
        }
        ep->owner[e] = owner[e];
        if (e < ep->q_e0[q]) ep->q_e0[q] = e;
        ep->q_e1[q] = e + 1;
    }
    for (int q = 0; q < W; q++)
        if (ep->q_e0[q] >= ep->q_e1[q]) ep->q_e0[q] = ep->q_e1[q] = 0; /* owns none */
    ep->e0 = ep->q_e0[ep->rank];
    ep->e1 = ep->q_e1[ep->rank];
    ep->R = W * G;
    const int nm = ep->e1 - ep->e0;
    EP_ALLOC(ep->layers, n_layers);
    for (int l = 0; l < n_layers; l++) {
        served_layer *s = &ep->layers[l];
        EP_ALLOC(s->off, nm + 1);
        EP_ALLOC(s->tok, ep->R);
        EP_ALLOC(s->micro, ep->R);
        EP_ALLOC(s->src_row, ep->R);
        EP_ALLOC(s->recv_rows, W);
        EP_ALLOC(s->src_cnt, (size_t)(nm > 0 ? nm : 1) * W);
        if (nm > 0) {
            EP_ALLOC(s->xe, (size_t)ep->R * D);
            EP_ALLOC(s->ye, (size_t)ep->R * D);
            EP_ALLOC(s->he, (size_t)ep->R * F);
            EP_ALLOC(s->ge, (size_t)ep->R * F);
            EP_ALLOC(s->mask, (size_t)ep->R * F);
        }
    }
    /* a forward chunk to one owner: counts + tokens + rows; all chunks ≤ G rows in all */
    ep->send_cap = sizeof(int32_t) * ((size_t)E + G) * 1 + sizeof(float) * (size_t)G * D +
                   sizeof(int32_t) * (size_t)E * W;
    ep->recv_cap = (size_t)W * (sizeof(int32_t) * ((size_t)E + G) + sizeof(float) * (size_t)G * D);
    EP_ALLOC(ep->send, ep->send_cap);
    EP_ALLOC(ep->recv, ep->recv_cap);
    EP_ALLOC(ep->send_bytes, W);
    EP_ALLOC(ep->recv_bytes, W);
    EP_ALLOC(ep->recv_row0, W);
    EP_ALLOC(ep->rows_in, (size_t)ep->R * D);
    EP_ALLOC(ep->rows_out, (size_t)ep->R * D);
    if (nm > 0) {
        EP_ALLOC(ep->dge, (size_t)ep->R * F);
        EP_ALLOC(ep->dhe, (size_t)ep->R * F);
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
    if (ep->layers)
        for (int l = 0; l < ep->n_layers; l++) {
            served_layer *s = &ep->layers[l];
            free(s->off), free(s->tok), free(s->micro), free(s->src_row), free(s->recv_rows), free(s->src_cnt);
            free(s->xe), free(s->ye), free(s->he), free(s->ge), free(s->mask);
        }
    free(ep->layers), free(ep->owner), free(ep->q_e0), free(ep->q_e1);
    free(ep->send), free(ep->recv), free(ep->send_bytes), free(ep->recv_bytes);
    free(ep->recv_row0), free(ep->rows_in), free(ep->rows_out);
    free(ep->dge), free(ep->dhe);
    free(ep);
    *self_p = NULL;
}

bool sy_ep_owns(const sy_ep_t *ep, int e) { return e >= ep->e0 && e < ep->e1; }
int sy_ep_first_expert(const sy_ep_t *ep) { return ep->e0; }
int sy_ep_last_expert(const sy_ep_t *ep) { return ep->e1; }

/* Rows routed by this rank to owner q (0 without a micro-batch). */
static int rows_to(const sy_ep_t *ep, const sy_switch_t *sw, int q) {
    if (!sw || ep->q_e1[q] == 0) return 0;
    return sw->offsets[ep->q_e1[q]] - sw->offsets[ep->q_e0[q]];
}

/* Packs this rank's dispatch rows into per-owner chunks (header + rows) in ep->send. */
static void pack_forward(sy_ep_t *ep, const sy_switch_t *sw) {
    const int D = ep->D;
    char *p = ep->send;
    for (int q = 0; q < ep->world; q++) {
        int nq = ep->q_e1[q] - ep->q_e0[q], rows = rows_to(ep, sw, q);
        if (nq == 0 || !sw) {
            ep->send_bytes[q] = 0;
            continue;
        }
        char *start = p;
        int r0 = sw->offsets[ep->q_e0[q]];
        for (int e = ep->q_e0[q]; e < ep->q_e1[q]; e++) {
            int32_t c = sw->kept[e];
            memcpy(p, &c, sizeof c);
            p += sizeof c;
        }
        memcpy(p, sw->order + r0, sizeof(int32_t) * (size_t)rows);
        p += sizeof(int32_t) * (size_t)rows;
        memcpy(p, sw->xe + (size_t)r0 * D, sizeof(float) * (size_t)rows * D);
        p += sizeof(float) * (size_t)rows * D;
        ep->send_bytes[q] = (size_t)(p - start);
    }
}

sy_status sy_ep_forward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex,
                        double dropout, sy_switch_key key) {
    const int W = ep->world, D = ep->D, F = ep->F, nm = ep->e1 - ep->e0;
    served_layer *s = &ep->layers[sl];
    if (sw) sw->dropout = (float)dropout;
    pack_forward(ep, sw);
    SY_CHECK(sy_comm_alltoallv(ep->comm, ep->send, ep->send_bytes, ep->recv, ep->recv_cap,
                               ep->recv_bytes));

    /* Parse every source's chunk: counts per my expert, tokens, rows. */
    const char *p = ep->recv;
    int total = 0;
    int32_t counts[W][nm > 0 ? nm : 1];
    const int32_t *toks[W];
    const float *rows[W];
    for (int src = 0; src < W; src++) {
        size_t nb = ep->recv_bytes[src];
        s->recv_rows[src] = 0;
        ep->recv_row0[src] = total;
        if (nb == 0) {
            for (int i = 0; i < nm; i++) counts[src][i] = 0;
            toks[src] = NULL, rows[src] = NULL;
            continue;
        }
        if (nm == 0 || nb < sizeof(int32_t) * (size_t)nm)
            return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent %zu bytes to a rank owning %d experts", src, nb, nm);
        memcpy(counts[src], p, sizeof(int32_t) * (size_t)nm);
        int n = 0;
        for (int i = 0; i < nm; i++) {
            if (counts[src][i] < 0 || counts[src][i] > ep->G)
                return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent a bad row count", src);
            n += counts[src][i];
        }
        size_t want = sizeof(int32_t) * ((size_t)nm + n) + sizeof(float) * (size_t)n * D;
        if (nb != want || total + n > ep->R)
            return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent %zu bytes, expected %zu", src, nb, want);
        toks[src] = (const int32_t *)(p + sizeof(int32_t) * nm);
        rows[src] = (const float *)(p + sizeof(int32_t) * ((size_t)nm + n));
        s->recv_rows[src] = n;
        total += n;
        p += nb;
    }
    s->n_rows = total;
    s->dropout = (float)dropout;

    /* Local expert-major order: expert e's rows from source 0, then 1, ... */
    int li = 0;
    for (int i = 0; i < nm; i++) {
        s->off[i] = li;
        for (int src = 0; src < W; src++) {
            s->src_cnt[i * W + src] = counts[src][i];
            int before = 0;
            for (int k = 0; k < i; k++) before += counts[src][k];
            for (int r = 0; r < counts[src][i]; r++, li++) {
                int srow = before + r;
                memcpy(s->xe + (size_t)li * D, rows[src] + (size_t)srow * D, sizeof(float) * D);
                s->tok[li] = toks[src][srow];
                s->micro[li] = key.micro + src;
                s->src_row[li] = ep->recv_row0[src] + srow;
            }
        }
    }
    s->off[nm] = li;

    for (int i = 0; i < nm; i++) {
        int r0 = s->off[i];
        for (int src = 0; src < W; src++) {
            int n = s->src_cnt[i * W + src];
            sy_expert_mlp_fwd(ep->be, &ex[ep->e0 + i], n, D, F, s->xe + (size_t)r0 * D,
                              s->he + (size_t)r0 * F, s->ge + (size_t)r0 * F,
                              s->mask + (size_t)r0 * F, s->ye + (size_t)r0 * D, dropout, key,
                              s->tok + r0, s->micro + r0);
            r0 += n;
        }
    }

    /* Reply: outputs back to each source in the order it sent them. */
    for (int r = 0; r < total; r++)
        memcpy(ep->rows_out + (size_t)s->src_row[r] * D, s->ye + (size_t)r * D, sizeof(float) * D);
    for (int src = 0; src < W; src++) ep->send_bytes[src] = sizeof(float) * (size_t)s->recv_rows[src] * D;
    SY_CHECK(sy_comm_alltoallv(ep->comm, ep->rows_out, ep->send_bytes, sw ? (void *)sw->ye : (void *)ep->recv,
                               sw ? sizeof(float) * (size_t)ep->G * D : ep->recv_cap, ep->recv_bytes));
    for (int q = 0; q < W; q++)
        if (ep->recv_bytes[q] != sizeof(float) * (size_t)rows_to(ep, sw, q) * D)
            return sy_err_set(SY_EREMOTE, "expert exchange: rank %d returned %zu bytes of outputs, expected %zu",
                              q, ep->recv_bytes[q], sizeof(float) * (size_t)rows_to(ep, sw, q) * D);
    return SY_OK;
}

sy_status sy_ep_backward(sy_ep_t *ep, sy_switch_t *sw, int sl, const sy_expert_weights *ex) {
    const int W = ep->world, D = ep->D, F = ep->F, nm = ep->e1 - ep->e0;
    served_layer *s = &ep->layers[sl];
    /* Output gradients (g·dy, in dispatch order) to the owners. */
    char *p = ep->send;
    for (int q = 0; q < W; q++) {
        int rows = rows_to(ep, sw, q);
        ep->send_bytes[q] = sizeof(float) * (size_t)rows * D;
        if (rows) memcpy(p, sw->dye + (size_t)sw->offsets[ep->q_e0[q]] * D, ep->send_bytes[q]);
        p += ep->send_bytes[q];
    }
    SY_CHECK(sy_comm_alltoallv(ep->comm, ep->send, ep->send_bytes, ep->rows_in,
                               sizeof(float) * (size_t)ep->R * D, ep->recv_bytes));
    for (int src = 0; src < W; src++)
        if (ep->recv_bytes[src] != sizeof(float) * (size_t)s->recv_rows[src] * D)
            return sy_err_set(SY_EREMOTE, "expert exchange: rank %d sent %zu bytes of gradients, expected %zu",
                              src, ep->recv_bytes[src], sizeof(float) * (size_t)s->recv_rows[src] * D);
    /* Into local expert-major order (reusing rows_out as dye_local), backward, and back. */
    float *dye = ep->rows_out;
    for (int r = 0; r < s->n_rows; r++)
        memcpy(dye + (size_t)r * D, ep->rows_in + (size_t)s->src_row[r] * D, sizeof(float) * D);
    float *dxe_local = ep->rows_in; /* received gradients are consumed: reuse */
    /* One chunk per (expert, source): the same GEMM shapes, and with fp64 accumulators the same
     * accumulation sequence (micro-batch order), as the single-process layer. dxe goes into
     * ye's slot (the outputs are no longer needed). */
    for (int i = 0; i < nm; i++) {
        int r0 = s->off[i];
        for (int src = 0; src < W; src++) {
            int n = s->src_cnt[i * W + src];
            sy_expert_mlp_bwd(ep->be, &ex[ep->e0 + i], n, D, F, dye + (size_t)r0 * D,
                              s->xe + (size_t)r0 * D, s->he + (size_t)r0 * F,
                              s->ge + (size_t)r0 * F,
                              s->dropout > 0.0f ? s->mask + (size_t)r0 * F : NULL,
                              ep->dge + (size_t)r0 * F, ep->dhe + (size_t)r0 * F,
                              s->ye + (size_t)r0 * D);
            r0 += n;
        }
    }
    for (int r = 0; r < s->n_rows; r++)
        memcpy(dxe_local + (size_t)s->src_row[r] * D, s->ye + (size_t)r * D, sizeof(float) * D);
    for (int src = 0; src < W; src++) ep->send_bytes[src] = sizeof(float) * (size_t)s->recv_rows[src] * D;
    SY_CHECK(sy_comm_alltoallv(ep->comm, dxe_local, ep->send_bytes, sw ? (void *)sw->dxe : (void *)ep->recv,
                               sw ? sizeof(float) * (size_t)ep->G * D : ep->recv_cap, ep->recv_bytes));
    for (int q = 0; q < W; q++)
        if (ep->recv_bytes[q] != sizeof(float) * (size_t)rows_to(ep, sw, q) * D)
            return sy_err_set(SY_EREMOTE, "expert exchange: rank %d returned %zu bytes of input gradients, expected %zu",
                              q, ep->recv_bytes[q], sizeof(float) * (size_t)rows_to(ep, sw, q) * D);
    return SY_OK;
}
