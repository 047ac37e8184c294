/* Thread-count-invariant sgemm for the CPU backend.
 *
 * OpenBLAS's multithreaded sgemm splits the output among its threads at boundaries that depend
 * on the thread count, and on some kernel families (Haswell/Zen: AVX2 + FMA) an output element
 * computed in an edge block of one split gets a different rounding than in the main block of
 * another. Results then depend on the thread count, and expert-parallel workers (which run with
 * fewer threads than a single process) drift from a single-process run.
 *
 * sy_sgemm computes C in fixed output tiles whose boundaries are a function of (M, N) and the
 * kernel family alone (sy_sgemm_tiling), each tile by one single-threaded OpenBLAS call over the whole K, the tiles
 * spread over this module's own OpenMP loop (which thread runs a tile does not matter). Every
 * output element therefore sees the same kernel, the same packing and the same K order whatever
 * the thread count: results are equal bit for bit for any number of threads, on any kernel
 * family OpenBLAS picks. They are not promised equal across kernel families or CPUs (vector
 * widths and FMA use differ).
 *
 * Thread: any; call it outside an OpenMP parallel region to use the threads (inside one it runs
 * the tiles on the calling thread, with the same result). */
#ifndef SY_GEMM_CPU_H
#define SY_GEMM_CPU_H

#include <stdbool.h>

typedef struct {
    int mt, nt; /* tile rows and columns of C */
} sy_gemm_tiles;

/* What happens to each tile of C once computed, while it is still in cache. */
typedef struct {
    bool round_bf16; /* round C to bf16 (round-to-nearest-even) */
    double *acc;     /* when set: acc[i, j] += C[i, j] (fp64, row-major, leading dim ldacc) */
    int ldacc;
    /* with acc, beta 0 and no rounding: C's contents afterwards are not needed, so a tile may
     * be computed in a per-thread buffer that stays in cache and only added into acc (same
     * numbers; C is then left unspecified) */
    bool c_scratch;
    /* GELU on the tile while it is in cache (the Switch experts' and the dense FFN's fc GEMMs;
     * each element as the backend's gelu_fwd / mul_inplace / gelu_bwd compute it, rounded to
     * bf16 with round_bf16, so the same bits as those separate passes):
     * forward, gelu_y set: gelu_y[i, j] = gelu(C[i, j]) (leading dim ldg), C keeps the
     *   pre-activation;
     * backward, gelu_pre set: C[i, j] *= mask[i, j] when mask is set (leading dim ldg, like
     *   gelu_pre and gelu_dx), then gelu_dx[i, j] = C[i, j] · gelu'(gelu_pre[i, j]).
     * Not with acc. */
    float *gelu_y;
    const float *gelu_pre, *mask;
    float *gelu_dx;
    int ldg;
} sy_gemm_epilogue;

/* The tiling used for an M×N output: a pure function of its arguments and of the OpenBLAS
 * kernel family the process runs (fixed at start-up), never of the thread count. scratch: the
 * tiles go through a per-thread buffer (epilogue c_scratch), which caps their area.
 * On every family but SkylakeX it is the pinned tiling below; on SkylakeX, whose kernels give
 * an element the same bits whatever the tile around it, large tiles grow (gemm_cpu.c). */
sy_gemm_tiles sy_sgemm_tiling_ex(int M, int N, int K, bool scratch);
sy_gemm_tiles sy_sgemm_tiling(int M, int N, int K); /* scratch false */
/* The pinned tiling (a function of M and N alone): the one every family but SkylakeX uses. */
sy_gemm_tiles sy_sgemm_tiling_pinned(int M, int N, int K);

/* Row-major C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, op = transpose when ta / tb
 * (A stored [K,M] with leading dimension lda when ta, else [M,K]; likewise B), then the
 * epilogue (NULL: none) per tile. */
void sy_sgemm_ex(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc,
                 const sy_gemm_epilogue *epi);

/* One problem of a group (sy_sgemm_group): the arguments of sy_sgemm_ex. */
typedef struct {
    bool ta, tb;
    int M, N, K;
    float alpha, beta;
    const float *A, *B;
    int lda, ldb;
    float *C;
    int ldc;
    sy_gemm_epilogue epi;
} sy_gemm_problem;

/* n independent problems in one parallel loop over all their tiles (each problem tiled exactly
 * as sy_sgemm_ex tiles it alone, so each result is the same bits). Problems must not write the
 * same C or epilogue accumulator. Fewer barriers and better balance than n calls: the Switch
 * layer's experts are many small GEMMs. */
void sy_sgemm_group(const sy_gemm_problem *p, int n);

/* sy_sgemm_ex with an optional bf16 rounding of C. */
void sy_sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc, bool round_bf16);

#endif
