/* bf16 storage (issue 10; model spec §4): the backend of `precision = bf16`, over a backend whose
 * kernels compute in fp32 (the CPU, emulation and CUDA backends).
 *
 * Buffers from alloc_act() are ACTIVATION buffers: their storage holds bf16 elements (2 bytes
 * each), and the handle alloc_act returns is a float * in a virtual address space (tag bit 61
 * set, buffer id in bits 40..60, byte offset in bits 0..39). Callers do their pointer arithmetic
 * in floats as before; the handle is not an address the host can use (non-canonical: a load
 * faults). Every op translates each operand:
 *   - a plain buffer (alloc()) passes through: fp32 masters, gradients, moments, LayerNorm
 *     statistics, attention probabilities, logits, the router path, integers, fp64;
 *   - an activation input is widened (exact) into fp32 scratch of the wrapped backend;
 *   - an activation output is computed into scratch (widened first when the op adds into it or
 *     leaves rows alone) and narrowed (round-to-nearest-even) into the bf16 storage afterwards.
 * The wrapped backend's bf16 flag is set per op: on when the op's activation output is an
 * activation buffer (so it rounds the way model spec §4 says: a GEMM's output once, an
 * accumulating GEMM's product before the add), off when it is a plain fp32 buffer (the LM
 * head's logits, the router's GEMMs). So the element type of each operand is its buffer's: the
 * rounding points follow from where the caller keeps each tensor, with no flag for callers to
 * flip. Narrowing a value the op already rounded is exact; where an op does not round (the
 * router-input gradient dh += u·g), the narrowing is the rounding the contract asks for.
 *
 * Host traffic in handle units: upload and download convert (bytes count 4 per element, as
 * the caller's floats do); copy converts between an activation buffer and a plain one, and
 * copies bf16 between two activation buffers; host_view of an activation buffer is NULL (the
 * callers stage through download / upload). wire_put / wire_get of bf16 rows (es = 2) from or
 * into an activation buffer is a plain copy of its bf16 bytes.
 *
 * storage_es 4 keeps the same handles over fp32 storage of bf16 values (today's layout before
 * this file; SY_BF16_STORAGE=f32): the test that typed storage gives the same bits compares the
 * two (tests/test_backend_bf16.c).
 * Thread: one thread drives it, as any backend (the scratch, the pending outputs and the buffer
 * table are unlocked). Traffic that involves no activation buffer (upload, download, copy, zero
 * of plain buffers; alloc and free of plain buffers) touches none of that state and goes
 * straight to the wrapped backend, so it keeps that backend's thread rules: the peer-replica
 * thread downloads the fp32 masters and moments while the training thread runs ops
 * (worker/replica.c "Any thread"). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend_cpu_internal.h"
#include "base/log.h"

#define LP_TAG ((uintptr_t)1 << 61)
#define LP_ID_SHIFT 40
#define LP_ID_MAX (((uintptr_t)1 << 21) - 1)
#define LP_OFF_MASK (((uintptr_t)1 << LP_ID_SHIFT) - 1)
/* the poisoned variant's tag (backend_poison.c), which may sit on top of ours */
#define LP_POISON ((uintptr_t)1 << 62)

typedef struct {
    void *phys; /* the wrapped backend's buffer of n elements of storage_es bytes; NULL: free */
    size_t n;
} lp_buf;

typedef struct {
    char *base;
    size_t cap, used;
} lp_block;

/* an activation output computed in scratch, narrowed into storage when the op is done */
typedef struct {
    float *scratch;
    void *phys;
    size_t n;
} lp_pending;

typedef struct {
    sy_backend_t pub; /* first: the table the callers see */
    sy_backend_t *in; /* the wrapped backend (owned) */
    int es;           /* storage bytes per activation element: 2 (bf16) or 4 */
    lp_buf *buf;
    size_t nbuf, capbuf;
    uint32_t *freeid;
    size_t nfree;
    lp_block *blk; /* scratch: blocks used by the current op (blk[0] is kept between ops) */
    size_t nblk, capblk, high;
    lp_pending *pend;
    size_t npend, cappend;
} lp_be;

static lp_be *LP(sy_backend_t *be) { return (lp_be *)be; }

static void oom(const char *what) {
    /* The op table has no error return; scratch is a few activation tensors. */
    sy_error("bf16 backend: out of memory (%s)", what);
    abort();
}

static bool is_lp(const void *h) { return ((uintptr_t)h & LP_TAG) != 0; }
/* a handle's buffer id and byte offset (the poisoned variant's tag, if any, ignored) */
static size_t lp_id(const void *h) { return (size_t)(((uintptr_t)h & ~(LP_POISON | LP_TAG)) >> LP_ID_SHIFT); }
static size_t lp_off(const void *h) { return (size_t)((uintptr_t)h & LP_OFF_MASK); }

/* The storage element at handle h, and the elements from there to the end of its buffer. */
static void *phys_of(lp_be *w, const void *h, size_t *rest) {
    const size_t id = lp_id(h), off = lp_off(h);
    if (id >= w->nbuf || !w->buf[id].phys || off % sizeof(float) || off / sizeof(float) > w->buf[id].n) {
        sy_error("bf16 backend: %p is not a handle of a live activation buffer", h);
        abort();
    }
    const size_t e = off / sizeof(float);
    if (rest) *rest = w->buf[id].n - e;
    return (char *)w->buf[id].phys + e * (size_t)w->es;
}

/* ---- scratch: a bump allocator over the wrapped backend's memory; one block between ops ---- */

static float *scratch(lp_be *w, size_t n) {
    const size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    if (w->nblk && w->blk[w->nblk - 1].cap - w->blk[w->nblk - 1].used >= bytes) {
        lp_block *b = &w->blk[w->nblk - 1];
        float *p = (float *)(void *)(b->base + b->used);
        b->used += bytes;
        return p;
    }
    if (w->nblk == w->capblk) {
        size_t c = w->capblk ? 2 * w->capblk : 8;
        lp_block *nb = realloc(w->blk, c * sizeof *nb);
        if (!nb) oom("scratch list");
        w->blk = nb, w->capblk = c;
    }
    size_t cap = bytes > ((size_t)1 << 20) ? bytes : ((size_t)1 << 20);
    char *p = w->in->alloc(w->in, cap);
    if (!p) oom("scratch");
    w->blk[w->nblk++] = (lp_block){.base = p, .cap = cap, .used = bytes};
    return (float *)(void *)p;
}

/* The op is done: narrow its activation outputs, then keep one scratch block as large as the
 * op's whole use, so the next op of that size bumps in one block. */
static void finish(lp_be *w) {
    sy_backend_t *in = w->in;
    for (size_t i = 0; i < w->npend; i++) {
        const lp_pending *p = &w->pend[i];
        if (w->es == 2) {
            in->wire_put(in, p->phys, p->scratch, p->n, 2);
        } else { /* fp32 storage: the op wrote it in place; round what it left unrounded */
            const bool bf = in->bf16;
            in->bf16 = true;
            in->round_bf16(in, p->phys, p->n);
            in->bf16 = bf;
        }
    }
    w->npend = 0;
    size_t total = 0;
    for (size_t i = 0; i < w->nblk; i++) total += w->blk[i].used;
    if (total > w->high) w->high = total;
    if (w->nblk > 1) {
        for (size_t i = 0; i < w->nblk; i++) in->free(in, w->blk[i].base);
        w->nblk = 0;
        char *p = in->alloc(in, w->high);
        if (!p) oom("scratch");
        w->blk[w->nblk++] = (lp_block){.base = p, .cap = w->high, .used = 0};
    } else if (w->nblk == 1) {
        w->blk[0].used = 0;
    }
}

/* n of an operand whose extent the op's shape does not give (a gathered source, a scatter
 * target): to the end of its buffer */
#define REST SIZE_MAX

/* An input operand of n elements (REST: to the end of its buffer): plain buffers as they are,
 * activation buffers widened into scratch (fp32 storage: as they are). */
static const float *arg_in(lp_be *w, const float *h, size_t n) {
    if (!h || !is_lp(h)) return h;
    size_t rest;
    void *p = phys_of(w, h, &rest);
    if (n > rest) n = rest;
    if (w->es == 4) return p;
    float *s = scratch(w, n);
    w->in->wire_get(w->in, s, p, n, 2);
    return s;
}

/* An output operand of n elements (REST: to the end of its buffer); keep: the op reads it too
 * (+=, or rows it leaves alone), so it is widened first. */
static float *arg_out(lp_be *w, float *h, size_t n, bool keep) {
    if (!h || !is_lp(h)) return h;
    size_t rest;
    void *p = phys_of(w, h, &rest);
    if (n > rest) n = rest;
    float *s = p;
    if (w->es == 2) {
        s = scratch(w, n);
        if (keep) w->in->wire_get(w->in, s, p, n, 2);
    }
    if (w->npend == w->cappend) {
        size_t c = w->cappend ? 2 * w->cappend : 64;
        lp_pending *np = realloc(w->pend, c * sizeof *np);
        if (!np) oom("pending outputs");
        w->pend = np, w->cappend = c;
    }
    w->pend[w->npend++] = (lp_pending){.scratch = s, .phys = p, .n = n};
    return s;
}

/* The wrapped backend, rounding its outputs iff the op's activation output `out` is an
 * activation buffer. */
static sy_backend_t *IN(lp_be *w, const void *out) {
    w->in->bf16 = out == NULL || is_lp(out);
    return w->in;
}

/* ---- memory and traffic ---------------------------------------------------------------- */

static void *b_alloc(sy_backend_t *be, size_t bytes) { return LP(be)->in->alloc(LP(be)->in, bytes); }

static void *b_alloc_act(sy_backend_t *be, size_t n) {
    lp_be *w = LP(be);
    if ((n * sizeof(float)) > LP_OFF_MASK) {
        sy_error("bf16 backend: an activation buffer of %zu elements is beyond the handle's range", n);
        return NULL;
    }
    void *p = w->in->alloc(w->in, (n ? n : 1) * (size_t)w->es);
    if (!p) return NULL;
    size_t id;
    if (w->nfree) {
        id = w->freeid[--w->nfree];
    } else {
        if (w->nbuf == w->capbuf) {
            size_t c = w->capbuf ? 2 * w->capbuf : 64;
            lp_buf *nb = realloc(w->buf, c * sizeof *nb);
            uint32_t *nf = realloc(w->freeid, c * sizeof *nf);
            if (nb) w->buf = nb;
            if (nf) w->freeid = nf;
            if (!nb || !nf || c - 1 > LP_ID_MAX) {
                w->in->free(w->in, p);
                return NULL;
            }
            w->capbuf = c;
        }
        id = w->nbuf++;
    }
    w->buf[id] = (lp_buf){.phys = p, .n = n};
    return (void *)(LP_TAG | ((uintptr_t)id << LP_ID_SHIFT));
}

static void b_free(sy_backend_t *be, void *p) {
    lp_be *w = LP(be);
    if (!is_lp(p)) {
        w->in->free(w->in, p);
        return;
    }
    const size_t id = lp_id(p);
    if (id >= w->nbuf || !w->buf[id].phys || lp_off(p)) {
        sy_error("bf16 backend: free of %p, not an activation buffer", p);
        abort();
    }
    w->in->free(w->in, w->buf[id].phys);
    w->buf[id].phys = NULL;
    w->freeid[w->nfree++] = (uint32_t)id;
}

static void b_upload(sy_backend_t *be, void *dst, const void *src_host, size_t bytes) {
    lp_be *w = LP(be);
    if (!is_lp(dst)) {
        w->in->upload(w->in, dst, src_host, bytes);
        return;
    }
    const size_t n = bytes / sizeof(float);
    void *p = phys_of(w, dst, NULL);
    if (w->es == 4) {
        w->in->upload(w->in, p, src_host, bytes);
        arg_out(w, dst, n, true);
    } else {
        float *s = scratch(w, n);
        w->in->upload(w->in, s, src_host, bytes);
        w->in->wire_put(w->in, p, s, n, 2);
    }
    finish(w);
}

static void b_download(sy_backend_t *be, void *dst_host, const void *src, size_t bytes) {
    lp_be *w = LP(be);
    if (!is_lp(src)) { /* plain: no state of ours touched (any thread, as the wrapped backend) */
        w->in->download(w->in, dst_host, src, bytes);
        return;
    }
    const float *s = arg_in(w, src, bytes / sizeof(float));
    w->in->download(w->in, dst_host, s, bytes);
    finish(w);
}

static void b_copy(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    lp_be *w = LP(be);
    const size_t n = bytes / sizeof(float);
    if (is_lp(dst) && is_lp(src)) {
        w->in->copy(w->in, phys_of(w, dst, NULL), phys_of(w, src, NULL), n * (size_t)w->es);
        return;
    }
    if (!is_lp(dst) && !is_lp(src)) {
        w->in->copy(w->in, dst, src, bytes);
        return;
    }
    const float *s = arg_in(w, src, n);
    float *d = arg_out(w, dst, n, false);
    w->in->copy(w->in, d, s, bytes);
    finish(w);
}

static void b_zero(sy_backend_t *be, void *p, size_t bytes) {
    lp_be *w = LP(be);
    if (is_lp(p))
        w->in->zero(w->in, phys_of(w, p, NULL), bytes / sizeof(float) * (size_t)w->es);
    else
        w->in->zero(w->in, p, bytes);
}

static void b_sync(sy_backend_t *be) { LP(be)->in->sync(LP(be)->in); }

static void *b_host_view(sy_backend_t *be, void *p) {
    return is_lp(p) ? NULL : LP(be)->in->host_view(LP(be)->in, p);
}

/* ---- the parameter path: plain buffers (translated all the same, should one be an
 * activation buffer) ---- */

static void b_acc_add_f32(sy_backend_t *be, double *acc, const float *g, size_t n) {
    lp_be *w = LP(be);
    const float *G = arg_in(w, g, n);
    IN(w, NULL)->acc_add_f32(w->in, acc, G, n);
    finish(w);
}
static void b_acc_to_f32(sy_backend_t *be, float *g, const double *acc, size_t n) {
    lp_be *w = LP(be);
    float *G = arg_out(w, g, n, false);
    IN(w, g)->acc_to_f32(w->in, G, acc, n);
    finish(w);
}
static void b_sumsq_add(sy_backend_t *be, double *out, const float *x, size_t n) {
    lp_be *w = LP(be);
    const float *X = arg_in(w, x, n);
    IN(w, NULL)->sumsq_add(w->in, out, X, n);
    finish(w);
}
static void b_scale(sy_backend_t *be, float *x, size_t n, float c) {
    lp_be *w = LP(be);
    float *X = arg_out(w, x, n, true);
    IN(w, x)->scale(w->in, X, n, c);
    finish(w);
}
static void b_adamw(sy_backend_t *be, float *p, const float *g, float *m, float *v, size_t n, float decay,
                    float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    lp_be *w = LP(be);
    const float *G = arg_in(w, g, n);
    float *P = arg_out(w, p, n, true), *M = arg_out(w, m, n, true), *V = arg_out(w, v, n, true);
    IN(w, p)->adamw(w->in, P, G, M, V, n, decay, b1, b2, step_size, inv_sqrt_bc2, eps);
    finish(w);
}
/* An activation buffer holds bf16 values already; a plain one is rounded in place (the
 * bf16-router ablation's weights and outputs). */
static void b_round_bf16(sy_backend_t *be, float *x, size_t n) {
    lp_be *w = LP(be);
    if (is_lp(x)) return;
    IN(w, NULL)->round_bf16(w->in, x, n);
}

/* ---- model ops ----------------------------------------------------------------------------- */

static void b_embed_fwd(sy_backend_t *be, float *x, const int32_t *tok, const float *wte,
                        const float *wpe, int N, int T, int D) {
    lp_be *w = LP(be);
    const float *E = arg_in(w, wte, REST), *P = arg_in(w, wpe, (size_t)T * D);
    float *X = arg_out(w, x, (size_t)N * D, false);
    IN(w, x)->embed_fwd(w->in, X, tok, E, P, N, T, D);
    finish(w);
}
static void b_embed_bwd(sy_backend_t *be, float *dwte, float *dwpe, const float *dx,
                        const int32_t *tok, int N, int T, int D) {
    lp_be *w = LP(be);
    const float *DX = arg_in(w, dx, (size_t)N * D);
    float *GE = arg_out(w, dwte, REST, true), *GP = arg_out(w, dwpe, (size_t)T * D, true);
    IN(w, NULL)->embed_bwd(w->in, GE, GP, DX, tok, N, T, D);
    finish(w);
}
static void b_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N, int in,
                         int out) {
    lp_be *w = LP(be);
    const float *X = arg_in(w, x, (size_t)N * in), *Wt = arg_in(w, W, (size_t)out * in);
    float *Y = arg_out(w, y, (size_t)N * out, false);
    IN(w, y)->matmul_fwd(w->in, Y, X, Wt, N, in, out);
    finish(w);
}
static void b_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy, const float *x,
                         const float *W, int N, int in, int out, bool accumulate_dx) {
    lp_be *w = LP(be);
    const float *DY = arg_in(w, dy, (size_t)N * out), *X = arg_in(w, x, (size_t)N * in),
                *Wt = arg_in(w, W, (size_t)out * in);
    float *DX = arg_out(w, dx, (size_t)N * in, accumulate_dx), *DW = arg_out(w, dW, (size_t)out * in, true);
    IN(w, dx)->matmul_bwd(w->in, DX, DW, DY, X, Wt, N, in, out, accumulate_dx);
    finish(w);
}
static void b_matmul_bwd_acc64(sy_backend_t *be, float *dx, float *dW, double *dW64, const float *dy,
                               const float *x, const float *W, int N, int in, int out) {
    lp_be *w = LP(be);
    const float *DY = arg_in(w, dy, (size_t)N * out), *X = arg_in(w, x, (size_t)N * in),
                *Wt = arg_in(w, W, (size_t)out * in);
    float *DX = arg_out(w, dx, (size_t)N * in, false), *DW = arg_out(w, dW, (size_t)out * in, false);
    IN(w, dx)->matmul_bwd_acc64(w->in, DX, DW, dW64, DY, X, Wt, N, in, out);
    finish(w);
}

/* Pointer arrays of the grouped ops: operand i of N[i]·per_row elements (N NULL: `fixed`); an
 * empty problem's operand is an empty piece of scratch (a valid pointer the op never reads). */
static const float **arr_in(lp_be *w, const float *const *h, const int *N, int n, size_t per_row,
                            size_t fixed) {
    if (!h) return NULL;
    const float **a = malloc(sizeof *a * (size_t)(n > 0 ? n : 1));
    if (!a) oom("pointer array");
    for (int i = 0; i < n; i++) a[i] = arg_in(w, h[i], N ? (size_t)N[i] * per_row : fixed);
    return a;
}
static float **arr_out(lp_be *w, float *const *h, const int *N, int n, size_t per_row, size_t fixed,
                       bool keep) {
    if (!h) return NULL;
    float **a = malloc(sizeof *a * (size_t)(n > 0 ? n : 1));
    if (!a) oom("pointer array");
    for (int i = 0; i < n; i++) a[i] = arg_out(w, h[i], N ? (size_t)N[i] * per_row : fixed, keep);
    return a;
}
/* the op's activation output: the first problem's (problems of one call share kinds) */
static const void *first(float *const *h, int n) { return h && n > 0 ? h[0] : NULL; }

static void b_matmul_fwd_group(sy_backend_t *be, float *const *y, const float *const *x,
                               const float *const *W, const int *N, int n, int in, int out) {
    lp_be *w = LP(be);
    const float **X = arr_in(w, x, N, n, (size_t)in, 0), **Wt = arr_in(w, W, NULL, n, 0, (size_t)out * in);
    float **Y = arr_out(w, y, N, n, (size_t)out, 0, false);
    IN(w, first(y, n))->matmul_fwd_group(w->in, Y, X, Wt, N, n, in, out);
    finish(w);
    free(X), free(Wt), free(Y);
}
static void b_matmul_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW, double *const *dW64,
                               const float *const *dy, const float *const *x, const float *const *W,
                               const int *N, int n, int in, int out) {
    lp_be *w = LP(be);
    const float **DY = arr_in(w, dy, N, n, (size_t)out, 0), **X = arr_in(w, x, N, n, (size_t)in, 0),
                **Wt = arr_in(w, W, NULL, n, 0, (size_t)out * in);
    float **DX = arr_out(w, dx, N, n, (size_t)in, 0, false);
    float **DW = arr_out(w, dW, NULL, n, 0, (size_t)out * in, true);
    IN(w, first(dx, n))->matmul_bwd_group(w->in, DX, DW, dW64, DY, X, Wt, N, n, in, out);
    finish(w);
    free(DY), free(X), free(Wt), free(DX), free(DW);
}
static void b_matmul_gelu_fwd_group(sy_backend_t *be, float *const *y, float *const *g,
                                    const float *const *x, const float *const *W, const int *N, int n,
                                    int in, int out) {
    lp_be *w = LP(be);
    const float **X = arr_in(w, x, N, n, (size_t)in, 0), **Wt = arr_in(w, W, NULL, n, 0, (size_t)out * in);
    float **Y = arr_out(w, y, N, n, (size_t)out, 0, false), **Gg = arr_out(w, g, N, n, (size_t)out, 0, false);
    IN(w, first(y, n))->matmul_gelu_fwd_group(w->in, Y, Gg, X, Wt, N, n, in, out);
    finish(w);
    free(X), free(Wt), free(Y), free(Gg);
}
static void b_matmul_gelu_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                                    double *const *dW64, const float *const *dy, const float *const *x,
                                    const float *const *W, const float *const *mask,
                                    const float *const *pre, float *const *dpre, const int *N, int n,
                                    int in, int out) {
    lp_be *w = LP(be);
    const float **DY = arr_in(w, dy, N, n, (size_t)out, 0), **X = arr_in(w, x, N, n, (size_t)in, 0),
                **Wt = arr_in(w, W, NULL, n, 0, (size_t)out * in), **M = arr_in(w, mask, N, n, (size_t)in, 0),
                **PRE = arr_in(w, pre, N, n, (size_t)in, 0);
    float **DX = arr_out(w, dx, N, n, (size_t)in, 0, false), **DPRE = arr_out(w, dpre, N, n, (size_t)in, 0, false);
    float **DW = arr_out(w, dW, NULL, n, 0, (size_t)out * in, true);
    IN(w, first(dx, n))->matmul_gelu_bwd_group(w->in, DX, DW, dW64, DY, X, Wt, M, PRE, DPRE, N, n, in, out);
    finish(w);
    free(DY), free(X), free(Wt), free(M), free(PRE), free(DX), free(DPRE), free(DW);
}
static void b_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd, const float *x,
                            const float *wt, int N, int D) {
    lp_be *w = LP(be);
    const float *X = arg_in(w, x, (size_t)N * D), *Wt = arg_in(w, wt, (size_t)D);
    float *Y = arg_out(w, y, (size_t)N * D, false), *MU = arg_out(w, mean, (size_t)N, false),
          *RS = arg_out(w, rstd, (size_t)N, false);
    IN(w, y)->layernorm_fwd(w->in, Y, MU, RS, X, Wt, N, D);
    finish(w);
}
static void b_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy, const float *x,
                            const float *wt, const float *mean, const float *rstd, int N, int D) {
    lp_be *w = LP(be);
    const float *DY = arg_in(w, dy, (size_t)N * D), *X = arg_in(w, x, (size_t)N * D),
                *Wt = arg_in(w, wt, (size_t)D);
    const float *MU = arg_in(w, mean, (size_t)N), *RS = arg_in(w, rstd, (size_t)N);
    float *DX = arg_out(w, dx, (size_t)N * D, true), *DW = arg_out(w, dw, (size_t)D, true);
    IN(w, dx)->layernorm_bwd(w->in, DX, DW, DY, X, Wt, MU, RS, N, D);
    finish(w);
}
static void b_attention_fwd(sy_backend_t *be, float *out, float *att, const float *qkv, int B, int T,
                            int D, int H) {
    lp_be *w = LP(be);
    const size_t n = (size_t)B * T;
    const float *QKV = arg_in(w, qkv, n * 3 * D);
    float *O = arg_out(w, out, n * D, false), *ATT = arg_out(w, att, n * H * T, false);
    IN(w, out)->attention_fwd(w->in, O, ATT, QKV, B, T, D, H);
    finish(w);
}
static void b_attention_bwd(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                            const float *qkv, int B, int T, int D, int H) {
    lp_be *w = LP(be);
    const size_t n = (size_t)B * T;
    const float *DO = arg_in(w, dout, n * D), *QKV = arg_in(w, qkv, n * 3 * D),
                *ATT = arg_in(w, att, n * H * T);
    float *DQKV = arg_out(w, dqkv, n * 3 * D, false);
    IN(w, dqkv)->attention_bwd(w->in, DQKV, DO, ATT, QKV, B, T, D, H);
    finish(w);
}
static void b_gelu_fwd(sy_backend_t *be, float *y, const float *x, size_t n) {
    lp_be *w = LP(be);
    const float *X = arg_in(w, x, n);
    float *Y = arg_out(w, y, n, false);
    IN(w, y)->gelu_fwd(w->in, Y, X, n);
    finish(w);
}
static void b_gelu_bwd(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n) {
    lp_be *w = LP(be);
    const float *DY = arg_in(w, dy, n), *X = arg_in(w, x, n);
    float *DX = arg_out(w, dx, n, false);
    IN(w, dx)->gelu_bwd(w->in, DX, DY, X, n);
    finish(w);
}
static void b_add_inplace(sy_backend_t *be, float *y, const float *x, size_t n) {
    lp_be *w = LP(be);
    const float *X = arg_in(w, x, n);
    float *Y = arg_out(w, y, n, true);
    IN(w, y)->add_inplace(w->in, Y, X, n);
    finish(w);
}
static double b_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits, const int32_t *targets,
                             int N, int V, float scale) {
    lp_be *w = LP(be);
    const size_t n = (size_t)N * V;
    const float *L = arg_in(w, logits, n);
    float *DL = arg_out(w, dlogits, n, false);
    double r = IN(w, dlogits)->xent_fwd_bwd(w->in, DL, L, targets, N, V, scale);
    finish(w);
    return r;
}
static double b_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N, int V) {
    lp_be *w = LP(be);
    const float *L = arg_in(w, logits, (size_t)N * V);
    double r = IN(w, NULL)->xent_fwd(w->in, L, targets, N, V);
    finish(w);
    return r;
}
static void b_gather_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n, int D) {
    lp_be *w = LP(be);
    const float *S = arg_in(w, src, REST);
    float *Dst = arg_out(w, dst, (size_t)n * D, false);
    IN(w, dst)->gather_rows(w->in, Dst, S, idx, n, D);
    finish(w);
}
static void b_scatter_rows_scaled(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                                  const float *scale, int n, int D) {
    lp_be *w = LP(be);
    const float *S = arg_in(w, src, (size_t)n * D), *SC = arg_in(w, scale, (size_t)n);
    float *Dst = arg_out(w, dst, REST, true);
    IN(w, dst)->scatter_rows_scaled(w->in, Dst, S, idx, SC, n, D);
    finish(w);
}
static void b_scatter_add_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n,
                               int D) {
    lp_be *w = LP(be);
    const float *S = arg_in(w, src, (size_t)n * D);
    float *Dst = arg_out(w, dst, REST, true);
    IN(w, dst)->scatter_add_rows(w->in, Dst, S, idx, n, D);
    finish(w);
}
static void b_gather_dot_scale(sy_backend_t *be, float *dot, float *out, const float *a, const float *b,
                               const int32_t *idx, const float *scale, int n, int D) {
    lp_be *w = LP(be);
    const float *A = arg_in(w, a, REST), *B = arg_in(w, b, (size_t)n * D), *SC = arg_in(w, scale, (size_t)n);
    float *DOT = arg_out(w, dot, (size_t)n, false), *O = arg_out(w, out, (size_t)n * D, false);
    IN(w, out)->gather_dot_scale(w->in, DOT, O, A, B, idx, SC, n, D);
    finish(w);
}
static void b_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate, float *lse,
                         const float *logits, int N, int E) {
    lp_be *w = LP(be);
    const float *L = arg_in(w, logits, (size_t)N * E);
    float *P = arg_out(w, probs, (size_t)N * E, false), *Gt = arg_out(w, gate, (size_t)N, false),
          *LSE = arg_out(w, lse, (size_t)N, false);
    IN(w, probs)->router_fwd(w->in, P, expert, Gt, LSE, L, N, E);
    finish(w);
}
static void b_router_bwd(sy_backend_t *be, float *dlogits, const float *probs, const int32_t *expert,
                         const float *gamma, const float *lse, const float *f, float aux_scale, float z_scale,
                         int N, int E) {
    lp_be *w = LP(be);
    const float *P = arg_in(w, probs, (size_t)N * E), *GA = arg_in(w, gamma, (size_t)N),
                *LSE = arg_in(w, lse, (size_t)N), *Fe = arg_in(w, f, (size_t)E);
    float *DL = arg_out(w, dlogits, (size_t)N * E, false);
    IN(w, dlogits)->router_bwd(w->in, DL, P, expert, GA, LSE, Fe, aux_scale, z_scale, N, E);
    finish(w);
}
static void b_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    lp_be *w = LP(be);
    const float *M = arg_in(w, mask, n);
    float *X = arg_out(w, x, n, true);
    IN(w, x)->mul_inplace(w->in, X, M, n);
    finish(w);
}

/* ---- route plan and wire ------------------------------------------------------------------ */

static void b_jitter_fwd(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D, float eps,
                         uint64_t seed, int64_t step, int micro, int layer) {
    lp_be *w = LP(be);
    const float *H = arg_in(w, h, (size_t)G * D);
    float *U = arg_out(w, u, (size_t)G * D, false), *XR = arg_out(w, xr, (size_t)G * D, false);
    IN(w, xr)->jitter_fwd(w->in, U, XR, H, G, D, eps, seed, step, micro, layer);
    finish(w);
}
static void b_jitter_bwd(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n) {
    lp_be *w = LP(be);
    const float *Gr = arg_in(w, g, n), *U = arg_in(w, u, n);
    float *DH = arg_out(w, dh, n, true);
    IN(w, dh)->jitter_bwd(w->in, DH, Gr, U, n);
    finish(w);
}
static void b_route_plan(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets, int32_t *order,
                         int32_t *slot, float *gk, const int32_t *expert, const float *gate, int G, int E,
                         int C) {
    lp_be *w = LP(be);
    const float *GT = arg_in(w, gate, (size_t)G);
    float *GK = arg_out(w, gk, (size_t)G, false);
    IN(w, gk)->route_plan(w->in, counts, kept, offsets, order, slot, GK, expert, GT, G, E, C);
    finish(w);
}
static void b_route_stats(sy_backend_t *be, double *stats, float *f, const float *probs, const float *lse,
                          const int32_t *counts, int G, int E) {
    lp_be *w = LP(be);
    const float *P = arg_in(w, probs, (size_t)G * E), *LSE = arg_in(w, lse, (size_t)G);
    float *Fe = arg_out(w, f, (size_t)E, false);
    IN(w, f)->route_stats(w->in, stats, Fe, P, LSE, counts, G, E);
    finish(w);
}
static void b_route_gamma(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot, int G) {
    lp_be *w = LP(be);
    const float *DOT = arg_in(w, dot, REST);
    float *GA = arg_out(w, gamma, (size_t)G, false);
    IN(w, gamma)->route_gamma(w->in, GA, DOT, slot, G);
    finish(w);
}
static void b_dropout_mask(sy_backend_t *be, float *mask, const int32_t *tok, const int32_t *micro, int n,
                           int F, float keep, float inv, uint64_t seed, int64_t step, int micro0, int layer) {
    lp_be *w = LP(be);
    float *M = arg_out(w, mask, (size_t)n * F, false);
    IN(w, mask)->dropout_mask(w->in, M, tok, micro, n, F, keep, inv, seed, step, micro0, layer);
    finish(w);
}
/* bf16 rows of bf16 storage: a copy of the stored bytes */
static void b_wire_put(sy_backend_t *be, void *dst, const float *src, size_t n, int es) {
    lp_be *w = LP(be);
    if (es == 2 && w->es == 2 && is_lp(src)) {
        w->in->copy(w->in, dst, phys_of(w, src, NULL), n * 2);
        return;
    }
    const float *S = arg_in(w, src, n);
    IN(w, NULL)->wire_put(w->in, dst, S, n, es);
    finish(w);
}
static void b_wire_get(sy_backend_t *be, float *dst, const void *src, size_t n, int es) {
    lp_be *w = LP(be);
    if (es == 2 && w->es == 2 && is_lp(dst)) {
        w->in->copy(w->in, phys_of(w, dst, NULL), src, n * 2);
        return;
    }
    float *D = arg_out(w, dst, n, false);
    IN(w, dst)->wire_get(w->in, D, src, n, es);
    finish(w);
}

static void b_destroy(sy_backend_t *be) {
    lp_be *w = LP(be);
    for (size_t i = 0; i < w->nblk; i++) w->in->free(w->in, w->blk[i].base);
    for (size_t i = 0; i < w->nbuf; i++)
        if (w->buf[i].phys) w->in->free(w->in, w->buf[i].phys);
    sy_backend_destroy(&w->in);
    free(w->blk), free(w->buf), free(w->freeid), free(w->pend);
    free(w);
}

sy_status sy_backend_bf16_wrap(sy_backend_t *inner, int storage_es, sy_backend_t **out) {
    *out = NULL;
    if (storage_es != 2 && storage_es != 4) {
        sy_backend_destroy(&inner);
        return sy_err_set(SY_EINVAL, "bf16 backend: storage of %d bytes an element (2 or 4)", storage_es);
    }
    lp_be *w = calloc(1, sizeof *w);
    if (!w) {
        sy_backend_destroy(&inner);
        return sy_err_set(SY_ENOMEM, "bf16 backend: out of memory");
    }
    w->in = inner;
    w->es = storage_es;
    sy_backend_t *b = &w->pub;
    b->name = inner->name;
    b->bf16 = true;
    b->alloc = b_alloc, b->alloc_act = b_alloc_act, b->free = b_free;
    b->upload = b_upload, b->download = b_download, b->copy = b_copy, b->zero = b_zero, b->sync = b_sync;
    b->host_view = b_host_view;
    b->acc_add_f32 = b_acc_add_f32, b->acc_to_f32 = b_acc_to_f32, b->sumsq_add = b_sumsq_add;
    b->scale = b_scale, b->adamw = b_adamw, b->round_bf16 = b_round_bf16;
    b->embed_fwd = b_embed_fwd, b->embed_bwd = b_embed_bwd;
    b->matmul_fwd = b_matmul_fwd, b->matmul_bwd = b_matmul_bwd, b->matmul_bwd_acc64 = b_matmul_bwd_acc64;
    b->matmul_fwd_group = b_matmul_fwd_group, b->matmul_bwd_group = b_matmul_bwd_group;
    b->matmul_gelu_fwd_group = inner->matmul_gelu_fwd_group ? b_matmul_gelu_fwd_group : NULL;
    b->matmul_gelu_bwd_group = inner->matmul_gelu_bwd_group ? b_matmul_gelu_bwd_group : NULL;
    b->layernorm_fwd = b_layernorm_fwd, b->layernorm_bwd = b_layernorm_bwd;
    b->attention_fwd = b_attention_fwd, b->attention_bwd = b_attention_bwd;
    b->gelu_fwd = b_gelu_fwd, b->gelu_bwd = b_gelu_bwd, b->add_inplace = b_add_inplace;
    b->xent_fwd_bwd = b_xent_fwd_bwd, b->xent_fwd = b_xent_fwd;
    b->gather_rows = b_gather_rows, b->scatter_rows_scaled = b_scatter_rows_scaled;
    b->scatter_add_rows = b_scatter_add_rows, b->gather_dot_scale = b_gather_dot_scale;
    b->router_fwd = b_router_fwd, b->router_bwd = b_router_bwd, b->mul_inplace = b_mul_inplace;
    b->jitter_fwd = b_jitter_fwd, b->jitter_bwd = b_jitter_bwd;
    b->route_plan = b_route_plan, b->route_stats = b_route_stats, b->route_gamma = b_route_gamma;
    b->dropout_mask = b_dropout_mask, b->wire_put = b_wire_put, b->wire_get = b_wire_get;
    b->destroy = b_destroy;
    *out = b;
    return SY_OK;
}

size_t sy_backend_bf16_storage_bytes(sy_backend_t *be) {
    if (!be || be->destroy != b_destroy) return 0;
    const lp_be *w = LP(be);
    size_t total = 0;
    for (size_t i = 0; i < w->nbuf; i++)
        if (w->buf[i].phys) total += w->buf[i].n * (size_t)w->es;
    return total;
}

sy_status sy_backend_bf16_maybe(sy_backend_t *inner, bool bf16, sy_backend_t **out) {
    if (!bf16) {
        *out = inner;
        return SY_OK;
    }
    const char *st = getenv("SY_BF16_STORAGE");
    int es = 2;
    if (st && st[0]) {
        if (!strcmp(st, "f32"))
            es = 4;
        else if (strcmp(st, "bf16")) {
            sy_backend_destroy(&inner);
            *out = NULL;
            return sy_err_set(SY_EINVAL, "SY_BF16_STORAGE=%s: expected bf16 (the default) or f32", st);
        }
    }
    return sy_backend_bf16_wrap(inner, es, out);
}
