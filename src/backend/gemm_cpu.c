#include "backend/gemm_cpu.h"

#include <cblas.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "backend/kernels/k_elementwise.h"
#include "base/bf16.h"

/* Tiles along one dimension of C: a dimension under SY_GEMM_TILE_SPLIT is one tile; up to
 * 2·SY_GEMM_TILE_CAP it is halved (so mid-sized GEMMs still use two threads); beyond, it is cut
 * into tiles of at most SY_GEMM_TILE_CAP. Tiles are as even as the dimension allows, rounded up
 * to a multiple of SY_GEMM_TILE_ALIGN (the kernels' register blocks). Each tile is a separate
 * OpenBLAS call that packs its own (mt + nt)·K panel floats for mt·nt·K multiply-adds, so tiles
 * must stay large: the cost of invariance is that repacking (docs/performance.md). */
#define SY_GEMM_TILE_CAP 512
#define SY_GEMM_TILE_SPLIT 256
#define SY_GEMM_TILE_ALIGN 32

/* On OpenBLAS's SkylakeX kernels an element's bits do not depend on where its tile starts or
 * ends (the AVX-512 kernel accumulates every element the same way, and the K blocking depends
 * on K alone), so there larger tiles repack less: a dimension under SY_GEMM_SKX_SPLIT is one
 * tile, beyond it tiles of at most SY_GEMM_SKX_CAP. Only tiles of at least SY_GEMM_SKX_MIN_MNK
 * multiply-adds under the pinned rule grow: smaller calls may take OpenBLAS's direct or
 * small-matrix kernels, which sum in another order, and a grown tile must not leave or enter
 * them. A grown tile is at most SY_GEMM_SKX_MAX_MNK multiply-adds (or the pinned tile's, if
 * larger), so that large GEMMs keep as many tiles, and threads, as before: growth is for the
 * Switch experts' GEMMs of a few hundred rows. Tiles computed in a scratch buffer
 * (sy_gemm_epilogue.c_scratch) are held to SY_GEMM_SCRATCH_FLOATS, so that the buffer stays in
 * the core's L2 cache between the GEMM writing it and the epilogue reading it. On every other kernel family the pinned tiles stay:
 * on Haswell's an element's bits change with the tile shape (tests/test_gemm_cpu.c checks the
 * grown tiles against the pinned ones bit for bit on whichever family runs). */
#define SY_GEMM_SKX_SPLIT 1024
#define SY_GEMM_SKX_CAP 1024
#define SY_GEMM_SKX_MIN_MNK (8.0 * 1024 * 1024)
#define SY_GEMM_SKX_MAX_MNK (512.0 * 1024 * 1024)
#define SY_GEMM_SCRATCH_FLOATS ((size_t)256 * 1024)

static int tile_len(int n, int split, int cap) {
    if (n < split) return n > 0 ? n : 1;
    const int k = n <= 2 * cap ? 2 : (n + cap - 1) / cap;
    const int t = (n + k - 1) / k;
    return (t + SY_GEMM_TILE_ALIGN - 1) / SY_GEMM_TILE_ALIGN * SY_GEMM_TILE_ALIGN;
}

sy_gemm_tiles sy_sgemm_tiling_pinned(int M, int N, int K) {
    (void)K;
    return (sy_gemm_tiles){.mt = tile_len(M, SY_GEMM_TILE_SPLIT, SY_GEMM_TILE_CAP),
                           .nt = tile_len(N, SY_GEMM_TILE_SPLIT, SY_GEMM_TILE_CAP)};
}

static bool g_grow; /* OpenBLAS runs its SkylakeX kernels: tiles may grow */
static pthread_once_t grow_once = PTHREAD_ONCE_INIT;
static void grow_init(void) {
    const char *c = openblas_get_corename();
    g_grow = c && strcasecmp(c, "SkylakeX") == 0;
}

static int halve(int n) {
    const int h = (n + 1) / 2;
    return (h + SY_GEMM_TILE_ALIGN - 1) / SY_GEMM_TILE_ALIGN * SY_GEMM_TILE_ALIGN;
}

sy_gemm_tiles sy_sgemm_tiling_ex(int M, int N, int K, bool scratch) {
    const sy_gemm_tiles pin = sy_sgemm_tiling_pinned(M, N, K);
    (void)pthread_once(&grow_once, grow_init);
    if (!g_grow || (double)pin.mt * pin.nt * K < SY_GEMM_SKX_MIN_MNK) return pin;
    sy_gemm_tiles t = {.mt = tile_len(M, SY_GEMM_SKX_SPLIT, SY_GEMM_SKX_CAP),
                       .nt = tile_len(N, SY_GEMM_SKX_SPLIT, SY_GEMM_SKX_CAP)};
    /* over the size bounds: halve the longer side (rounded up to the alignment), never below
     * the pinned tile */
    const double pin_mnk = (double)pin.mt * pin.nt * K;
    const double max_mnk = pin_mnk > SY_GEMM_SKX_MAX_MNK ? pin_mnk : SY_GEMM_SKX_MAX_MNK;
    while ((scratch && (size_t)t.mt * t.nt > SY_GEMM_SCRATCH_FLOATS) ||
           (double)t.mt * t.nt * K > max_mnk) {
        int *side = t.mt >= t.nt ? &t.mt : &t.nt, *other = side == &t.mt ? &t.nt : &t.mt;
        const int floor_s = side == &t.mt ? pin.mt : pin.nt, floor_o = side == &t.mt ? pin.nt : pin.mt;
        int h = halve(*side);
        if (h < floor_s) h = floor_s;
        if (h < *side) {
            *side = h;
            continue;
        }
        h = halve(*other); /* the longer side is at its floor: try the other one */
        if (h < floor_o) h = floor_o;
        if (h >= *other) break;
        *other = h;
    }
    return t;
}

sy_gemm_tiles sy_sgemm_tiling(int M, int N, int K) { return sy_sgemm_tiling_ex(M, N, K, false); }

/* Hot loops are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time
 * (as in backend_cpu.c); every variant computes the same IEEE operations per element. */
#define SY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

/* One tile row of the GELU epilogues (gemm_cpu.h): the per-element bodies of gelu_fwd,
 * mul_inplace and gelu_bwd (kernels/k_elementwise.h), in their order. */
SY_CLONES static void gelu_fwd_row(float *y, const float *c, int n, bool bf16) {
#pragma omp simd
    for (int j = 0; j < n; j++) y[j] = sy_k_act(sy_k_gelu(c[j]), bf16);
}

SY_CLONES static void gelu_bwd_row(float *dx, float *c, const float *mask, const float *pre, int n,
                                   bool bf16) {
    if (mask) {
#pragma omp simd
        for (int j = 0; j < n; j++) c[j] = sy_k_act(c[j] * mask[j], bf16);
    }
#pragma omp simd
    for (int j = 0; j < n; j++) dx[j] = sy_k_act(c[j] * sy_k_gelu_grad(pre[j]), bf16);
}

/* One tile row of the fp64 accumulation: a[j] += c[j] */
SY_CLONES static void acc_row(double *restrict a, const float *restrict c, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) a[j] += c[j];
}

static void epilogue(float *c, int ldc, int m, int n, const sy_gemm_epilogue *epi, int i0,
                     int j0) {
    if (epi->round_bf16)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                c[(size_t)i * ldc + j] = sy_round_bf16(c[(size_t)i * ldc + j]);
    if (epi->gelu_y)
        for (int i = 0; i < m; i++)
            gelu_fwd_row(epi->gelu_y + (size_t)(i0 + i) * epi->ldg + j0, c + (size_t)i * ldc, n,
                         epi->round_bf16);
    if (epi->gelu_pre) {
        const size_t g0 = (size_t)i0 * epi->ldg + j0;
        for (int i = 0; i < m; i++) {
            const size_t gi = g0 + (size_t)i * epi->ldg;
            gelu_bwd_row(epi->gelu_dx + gi, c + (size_t)i * ldc, epi->mask ? epi->mask + gi : NULL,
                         epi->gelu_pre + gi, n, epi->round_bf16);
        }
    }
    if (epi->acc)
        for (int i = 0; i < m; i++)
            acc_row(epi->acc + (size_t)(i0 + i) * epi->ldacc + j0, c + (size_t)i * ldc, n);
}

/* This thread's tile buffer for c_scratch epilogues (at least n floats; NULL if it cannot be
 * had, and the tile is then computed in C). Kept for the thread's life (one tile, <= 1 MiB) and
 * freed when the thread exits (a pthread key's destructor: OpenMP pools of threads that end,
 * such as the ranks of the threads data plane, would otherwise leak it). */
typedef struct {
    size_t cap;
    float v[];
} tile_buf;

static pthread_key_t tile_key;
static pthread_once_t tile_once = PTHREAD_ONCE_INIT;
static void tile_key_make(void) { (void)pthread_key_create(&tile_key, free); }

static float *thread_tile(size_t n) {
    (void)pthread_once(&tile_once, tile_key_make);
    tile_buf *b = pthread_getspecific(tile_key);
    if (!b || b->cap < n) {
        tile_buf *p = realloc(b, sizeof(tile_buf) + sizeof(float) * n);
        if (!p) return NULL;
        p->cap = n;
        if (pthread_setspecific(tile_key, p) != 0) {
            free(p);
            (void)pthread_setspecific(tile_key, NULL);
            return NULL;
        }
        b = p;
    }
    return b->v;
}

/* Whether run_tile computes the problem's tiles in the thread's scratch buffer. */
static bool uses_scratch(const sy_gemm_problem *p) {
    return p->epi.c_scratch && p->epi.acc && p->beta == 0.0f && !p->epi.round_bf16 && p->K > 0;
}

/* Tile t of a problem tiled tl (tn tiles per row of tiles). */
static void run_tile(const sy_gemm_problem *p, sy_gemm_tiles tl, int tn, int t) {
    const int i0 = (t / tn) * tl.mt, j0 = (t % tn) * tl.nt;
    const int m = p->M - i0 < tl.mt ? p->M - i0 : tl.mt;
    const int n = p->N - j0 < tl.nt ? p->N - j0 : tl.nt;
    const float *a = p->ta ? p->A + i0 : p->A + (size_t)i0 * p->lda;
    const float *b = p->tb ? p->B + (size_t)j0 * p->ldb : p->B + j0;
    float *c = p->C + (size_t)i0 * p->ldc + j0;
    int ldc = p->ldc;
    if (uses_scratch(p)) {
        float *tile = thread_tile((size_t)m * n);
        if (tile) c = tile, ldc = n;
    }
    if (p->K > 0) {
        cblas_sgemm(CblasRowMajor, p->ta ? CblasTrans : CblasNoTrans,
                    p->tb ? CblasTrans : CblasNoTrans, m, n, p->K, p->alpha, a, p->lda, b, p->ldb,
                    p->beta, c, ldc);
    } else {
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                c[(size_t)i * p->ldc + j] = p->beta == 0.0f ? 0.0f : p->beta * c[(size_t)i * p->ldc + j];
    }
    epilogue(c, ldc, m, n, &p->epi, i0, j0);
}

static int n_tiles(const sy_gemm_problem *p, sy_gemm_tiles *tl, int *tn) {
    if (p->M <= 0 || p->N <= 0) return 0;
    *tl = sy_sgemm_tiling_ex(p->M, p->N, p->K, uses_scratch(p));
    *tn = (p->N + tl->nt - 1) / tl->nt;
    return ((p->M + tl->mt - 1) / tl->mt) * *tn;
}

/* OpenBLAS (OpenMP build) runs single-threaded inside an active parallel region, or when the
 * OpenMP thread count is 1: every tile below is one single-threaded call. Dynamic scheduling
 * balances ragged tiles; a tile's result does not depend on its thread. */
void sy_sgemm_ex(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc,
                 const sy_gemm_epilogue *epi) {
    const sy_gemm_problem p = {.ta = ta, .tb = tb, .M = M, .N = N, .K = K, .alpha = alpha,
                               .beta = beta, .A = A, .B = B, .lda = lda, .ldb = ldb, .C = C,
                               .ldc = ldc, .epi = epi ? *epi : (sy_gemm_epilogue){0}};
    sy_gemm_tiles tl;
    int tn;
    const int nt = n_tiles(&p, &tl, &tn);
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < nt; t++) run_tile(&p, tl, tn, t);
}

void sy_sgemm_group(const sy_gemm_problem *p, int n) {
    enum { MAX_GROUP = 512 };
    if (n <= 0) return;
    if (n > MAX_GROUP) { /* split: same tiles, same results */
        for (int i = 0; i < n; i += MAX_GROUP) sy_sgemm_group(p + i, n - i < MAX_GROUP ? n - i : MAX_GROUP);
        return;
    }
    sy_gemm_tiles tl[MAX_GROUP];
    int tn[MAX_GROUP], cnt[MAX_GROUP], ord[MAX_GROUP], first[MAX_GROUP + 1];
    double work[MAX_GROUP];
    for (int i = 0; i < n; i++) {
        cnt[i] = n_tiles(&p[i], &tl[i], &tn[i]);
        work[i] = (double)(p[i].M < tl[i].mt ? p[i].M : tl[i].mt) *
                  (p[i].N < tl[i].nt ? p[i].N : tl[i].nt) * (p[i].K > 0 ? p[i].K : 1);
    }
    /* The loop hands out the largest tiles first (problems by decreasing tile size, stable),
     * so that the last tiles to finish are small ones and the threads end together: the
     * experts' row counts differ. Which thread runs a tile does not change its bits. */
    for (int i = 0; i < n; i++) {
        int j = i;
        while (j > 0 && work[ord[j - 1]] < work[i]) ord[j] = ord[j - 1], j--;
        ord[j] = i;
    }
    first[0] = 0;
    for (int k = 0; k < n; k++) first[k + 1] = first[k] + cnt[ord[k]];
    const int total = first[n];
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < total; t++) {
        int k = 0;
        while (first[k + 1] <= t) k++; /* n is small (experts x sources) */
        const int i = ord[k];
        run_tile(&p[i], tl[i], tn[i], t - first[k]);
    }
}

void sy_sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc, bool round_bf16) {
    const sy_gemm_epilogue epi = {.round_bf16 = round_bf16};
    sy_sgemm_ex(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, round_bf16 ? &epi : NULL);
}
