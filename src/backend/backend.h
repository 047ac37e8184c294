/* The compute backend: every op of the model spec as a forward/backward pair over device
 * buffers. The model (model.c) and the Switch layer (switch.c) call ops only through this
 * table, so a CUDA backend slots in by providing another table. The CPU backend (backend_cpu.c)
 * uses OpenBLAS for GEMMs and OpenMP for the rest.
 *
 * Buffers: every pointer an op takes is a BACKEND BUFFER (from alloc() or alloc_act(), or an
 * offset into one): typed (float *, double *, int32_t *) so shapes and units read as before, but
 * for a device backend it points into device memory, and an activation buffer of a bf16-mode
 * backend is a handle into bf16 storage. Code outside a backend never reads or writes through
 * it; host memory crosses only by upload/download (the "host <-> backend traffic" section).
 * Pointer arithmetic on a backend buffer (base + offset, in elements of its C type) is fine.
 *
 * Conventions: row-major; N = tokens in the call; shapes in comments. Weight gradients are
 * ACCUMULATED (+=) so micro-batches add up; activation gradients are overwritten unless the op
 * says "+=". All buffers come from alloc() / alloc_act() and stay the caller's.
 * Precision (model spec §4): a tensor's element type is its buffer's. The caller keeps the
 * tensors spec §4 stores in bf16 (activations, activation gradients, the GEMM weights' working
 * copy) in activation buffers (alloc_act) and everything else (fp32 masters, gradients, AdamW
 * moments, LayerNorm statistics, attention probabilities, logits, the router path) in plain
 * buffers (alloc). In bf16 mode (the table's `bf16` set: backend_bf16.c over a backend with
 * fp32 kernels) an op rounds, round-to-nearest-even, each activation it writes into an
 * activation buffer, and nothing it writes into a plain one; in fp32 mode activation buffers
 * are plain fp32 and nothing is rounded. A backend with fp32 kernels (CPU, emulation, CUDA)
 * rounds by its `bf16` flag instead, over fp32 storage: backend_bf16.c sets that flag per op
 * (on iff the op's activation output is an activation buffer); nothing else should set it.
 * Thread: one thread drives a backend; ops parallelise internally. */
#ifndef SY_BACKEND_H
#define SY_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct sy_backend sy_backend_t;

struct sy_backend {
    const char *name;
    bool bf16; /* bf16 mode (see "Precision" above); read-only for callers */

    void *(*alloc)(sy_backend_t *be, size_t bytes); /* zeroed; NULL on failure */
    /* An ACTIVATION buffer of n elements (zeroed; NULL on failure), addressed as float (handle
     * arithmetic in floats, bytes in traffic ops count 4 an element) whatever its storage: bf16
     * storage (2 bytes an element) in bf16 mode (backend_bf16.c), fp32 otherwise. NULL slot:
     * the backend stores activations as fp32, and sy_alloc_act uses alloc. Freed by free. */
    void *(*alloc_act)(sy_backend_t *be, size_t n);
    void (*free)(sy_backend_t *be, void *p);

    /* ---- host <-> backend traffic: the only way host memory and backend buffers meet ----
     * dst/src named *_host are ordinary host memory; the others are backend buffers. upload and
     * download return when the host buffer may be reused / read (they order after every op
     * issued before them); copy and zero are ordered like any other op. sync waits for every op
     * issued so far (a no-op on the CPU). */
    void (*upload)(sy_backend_t *be, void *dst, const void *src_host, size_t bytes);
    void (*download)(sy_backend_t *be, void *dst_host, const void *src, size_t bytes);
    void (*copy)(sy_backend_t *be, void *dst, const void *src, size_t bytes);
    void (*zero)(sy_backend_t *be, void *p, size_t bytes);
    void (*sync)(sy_backend_t *be);
    /* A host-accessible pointer to backend memory p (same bytes, valid while p is), or NULL when
     * the backend's memory is not host-accessible (a device backend). Where the host must hand a
     * backend buffer to host code (the data plane reads host memory), it uses this view when
     * non-NULL, else stages through download/upload. Reads and writes through the view are
     * ordered by sync() like a download/upload. The CPU backend returns p itself. */
    void *(*host_view)(sy_backend_t *be, void *p);

    /* ---- the parameter / gradient / optimizer path (model spec §5) ----
     * fp64 gradient accumulation: acc[n] += g[n] (each fp32 value widened, then added) */
    void (*acc_add_f32)(sy_backend_t *be, double *acc, const float *g, size_t n);
    /* g[n] = (float)acc[n] (round to nearest) */
    void (*acc_to_f32)(sy_backend_t *be, float *g, const double *acc, size_t n);
    /* out[0] += Σ x² in fp64 (backend buffer of one double). The order is fixed: chunks of
     * 4096 elements, each summed in order, the chunk sums added in order; the result does not
     * depend on the thread count, and a device backend must sum in this same order. */
    void (*sumsq_add)(sy_backend_t *be, double *out, const float *x, size_t n);
    /* x[n] *= c (gradient clipping) */
    void (*scale)(sy_backend_t *be, float *x, size_t n, float c);
    /* One AdamW update (optim.h, PINNED to torch.optim.AdamW) of n elements, all fp32:
     *   p *= decay; m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g·g;
     *   p −= step_size · m / (sqrt(v) · inv_sqrt_bc2 + eps)
     * evaluated in exactly this order, in fp32, without contraction into FMAs. */
    void (*adamw)(sy_backend_t *be, float *p, const float *g, float *m, float *v, size_t n,
                  float decay, float b1, float b2, float step_size, float inv_sqrt_bc2,
                  float eps);
    /* x[n] rounded to bf16 (RNE) in place, if be->bf16 (working weights after a step; ops that
     * write activations round by themselves) */
    void (*round_bf16)(sy_backend_t *be, float *x, size_t n);

    /* x[N,D] = wte[tok] + wpe[t mod T] */
    void (*embed_fwd)(sy_backend_t *be, float *x, const int32_t *tok, const float *wte,
                      const float *wpe, int N, int T, int D);
    /* dwte[tok] += dx, dwpe[t mod T] += dx */
    void (*embed_bwd)(sy_backend_t *be, float *dwte, float *dwpe, const float *dx,
                      const int32_t *tok, int N, int T, int D);

    /* y[N,out] = x[N,in] · W[out,in]ᵀ */
    void (*matmul_fwd)(sy_backend_t *be, float *y, const float *x, const float *W, int N,
                       int in, int out);
    /* dx[N,in] (= or += when accumulate) dy · W; dW[out,in] += dyᵀ · x. dx may be NULL. */
    void (*matmul_bwd)(sy_backend_t *be, float *dx, float *dW, const float *dy, const float *x,
                       const float *W, int N, int in, int out, bool accumulate_dx);
    /* The expert weight-gradient path of training: dx[N,in] = dy · W (overwritten) and
     * dW64[out,in] += (dyᵀ · x) computed in fp32 and added in fp64; dW[out,in] is fp32 scratch
     * (its contents afterwards are unspecified). Same numbers as zeroing dW, matmul_bwd, then
     * adding dW into dW64, without the extra passes. */
    void (*matmul_bwd_acc64)(sy_backend_t *be, float *dx, float *dW, double *dW64,
                             const float *dy, const float *x, const float *W, int N, int in,
                             int out);
    /* Grouped forms over n independent problems with the same in/out (the Switch layer's
     * experts): problem i is matmul_fwd(y[i], x[i], W[i], N[i]), resp. matmul_bwd_acc64 (or,
     * with dW64 == NULL, matmul_bwd with accumulate_dx false). Each result equals the single
     * call's. In the backward, dW64 NULL or dW64[i] NULL selects matmul_bwd for problem i;
     * no two problems may share a dW or dW64. */
    void (*matmul_fwd_group)(sy_backend_t *be, float *const *y, const float *const *x,
                             const float *const *W, const int *N, int n, int in, int out);
    void (*matmul_bwd_group)(sy_backend_t *be, float *const *dx, float *const *dW,
                             double *const *dW64, const float *const *dy,
                             const float *const *x, const float *const *W, const int *N, int n,
                             int in, int out);
    /* Optional (NULL: the caller runs the separate ops). The grouped GEMMs with GELU fused
     * in, applied to each output tile while it is in cache; same numbers as the separate ops:
     * matmul_gelu_fwd_group is matmul_fwd_group(y, x, W) then gelu_fwd(g[i], y[i]) (y keeps
     * the pre-activation); matmul_gelu_bwd_group is matmul_bwd_group(dx, dW, dW64, dy, x, W),
     * then mul_inplace(dx[i], mask[i]) when mask and mask[i] are set, then
     * gelu_bwd(dpre[i], dx[i], pre[i]). */
    void (*matmul_gelu_fwd_group)(sy_backend_t *be, float *const *y, float *const *g,
                                  const float *const *x, const float *const *W, const int *N,
                                  int n, int in, int out);
    void (*matmul_gelu_bwd_group)(sy_backend_t *be, float *const *dx, float *const *dW,
                                  double *const *dW64, const float *const *dy,
                                  const float *const *x, const float *const *W,
                                  const float *const *mask, const float *const *pre,
                                  float *const *dpre, const int *N, int n, int in, int out);

    /* y = (x - mean) · rstd · w (no bias, eps 1e-5); saves mean[N], rstd[N] */
    void (*layernorm_fwd)(sy_backend_t *be, float *y, float *mean, float *rstd, const float *x,
                          const float *w, int N, int D);
    /* dx += ..., dw += ... */
    void (*layernorm_bwd)(sy_backend_t *be, float *dx, float *dw, const float *dy,
                          const float *x, const float *w, const float *mean, const float *rstd,
                          int N, int D);

    /* causal attention. qkv[B,T,3D] (q, k, v blocks; heads contiguous D/H slices),
     * att[B,H,T,T] softmax probabilities (saved), out[B,T,D] */
    void (*attention_fwd)(sy_backend_t *be, float *out, float *att, const float *qkv, int B,
                          int T, int D, int H);
    /* dqkv[B,T,3D] = ... (overwritten) */
    void (*attention_bwd)(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                          const float *qkv, int B, int T, int D, int H);

    /* y = gelu_tanh(x), n elements */
    void (*gelu_fwd)(sy_backend_t *be, float *y, const float *x, size_t n);
    /* dx = dy · gelu'(x) */
    void (*gelu_bwd)(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n);

    /* y += x (residual), n elements */
    void (*add_inplace)(sy_backend_t *be, float *y, const float *x, size_t n);

    /* Cross-entropy of logits[N,V] against targets[N]; returns Σ_t loss_t (fp64 sum) and writes
     * dlogits = (softmax - onehot) · scale (in place over logits when dlogits == logits). */
    double (*xent_fwd_bwd)(sy_backend_t *be, float *dlogits, const float *logits,
                           const int32_t *targets, int N, int V, float scale);
    /* Cross-entropy only (evaluation): Σ_t loss_t */
    double (*xent_fwd)(sy_backend_t *be, const float *logits, const int32_t *targets, int N,
                       int V);

    /* Row gather/scatter for the Switch dispatch and combine.
     * gather: dst[i] = src[idx[i]] for i < n (rows of D)
     * scatter_scaled: dst[idx[i]] = scale[i] · src[i] (rows not named are left alone) */
    void (*gather_rows)(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n,
                        int D);
    void (*scatter_rows_scaled)(sy_backend_t *be, float *dst, const float *src,
                                const int32_t *idx, const float *scale, int n, int D);
    /* dst[idx[i]] += src[i] */
    void (*scatter_add_rows)(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                             int n, int D);
    /* dot[i] = ⟨a[idx[i]], b[i]⟩ and out[i] = scale[i] · a[idx[i]] (the combine backward) */
    void (*gather_dot_scale)(sy_backend_t *be, float *dot, float *out, const float *a,
                             const float *b, const int32_t *idx, const float *scale, int n,
                             int D);
    /* Router (fp32, model spec §2 steps 1-2): from logits[N,E] writes probs[N,E] (max-
     * subtracted softmax), expert[N] (argmax, ties → lowest index), gate[N] = probs[expert],
     * lse[N] = logsumexp(logits). Never rounded to bf16. */
    void (*router_fwd)(sy_backend_t *be, float *probs, int32_t *expert, float *gate, float *lse,
                       const float *logits, int N, int E);
    /* dlogits[N,E] = p ⊙ (dp − ⟨p, dp⟩) + z_scale · lse · p, with
     * dp_i = 1[i = expert]·gamma + aux_scale · f[i]  (gamma already 0 for dropped tokens) */
    void (*router_bwd)(sy_backend_t *be, float *dlogits, const float *probs,
                       const int32_t *expert, const float *gamma, const float *lse,
                       const float *f, float aux_scale, float z_scale, int N, int E);
    /* x *= mask (elementwise), n elements; rounded to bf16 in bf16 mode (expert dropout writes
     * an activation or an activation gradient) */
    void (*mul_inplace)(sy_backend_t *be, float *x, const float *mask, size_t n);

    /* ---- Switch layer: route plan (model spec §2, §3) ----
     * Everything the route computes per token or per expert, so that only the small per-layer
     * results (route_plan's counts/kept/offsets and route_stats' sums) cross to the host, in one
     * download. Integer results are exact in any implementation; the floating-point ones name
     * their operation order, which a device backend must keep (no atomics on floats). */

    /* Router jitter (spec §3): for each token t < G, u[t,:] ~ U[1-eps, 1+eps] drawn in order
     * i = 0..D-1 from sy_rng_key(seed, "router.jitter", step, micro, layer<<32 | t) as
     * u = 1 - eps + 2·eps·uniform (fp32, left to right), and xr[t,:] = h[t,:]·u[t,:]. */
    void (*jitter_fwd)(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D,
                       float eps, uint64_t seed, int64_t step, int micro, int layer);
    /* The router-input gradient: dh[n] += u[n]·g[n], or dh[n] += g[n] when u is NULL (fp32,
     * never rounded: the caller rounds dh afterwards). */
    void (*jitter_bwd)(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n);
    /* Capacity and the dispatch plan (spec §2 step 3) from expert[G] and gate[G]:
     *   pos[t]     = #{s < t : expert[s] = expert[t]} (exclusive prefix count in token order)
     *   counts[e]  = tokens routed to e (before capacity); kept[e] = min(counts[e], C)
     *   offsets[e] = Σ_{e' < e} kept[e'] (E+1 entries); token t is kept iff pos[t] < C
     *   slot[t]    = offsets[expert[t]] + pos[t] if kept, else -1
     *   order[slot[t]] = t, gk[slot[t]] = gate[t] for kept t (expert-major, token order within)
     * Integer scans only: exact whatever the implementation. */
    void (*route_plan)(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets,
                       int32_t *order, int32_t *slot, float *gk, const int32_t *expert,
                       const float *gate, int G, int E, int C);
    /* Load-balancing statistics (spec §2 steps 4-5), fp64, in this order: for e = 0..E-1:
     * P_e = Σ_{t=0..G-1} probs[t,e] (in t order), f_e = counts[e]/G, aux += f_e·(P_e/G);
     * z = Σ_t lse[t]² in t order. Writes stats[0] = E·aux, stats[1] = z/G (a backend buffer of
     * two doubles) and f[e] = (float)f_e. */
    void (*route_stats)(sy_backend_t *be, double *stats, float *f, const float *probs,
                        const float *lse, const int32_t *counts, int G, int E);
    /* The combine backward's per-token gate gradient: gamma[t] = slot[t] ≥ 0 ? dot[slot[t]] : 0
     * for t < G. */
    void (*route_gamma)(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot,
                        int G);
    /* Expert dropout mask (spec §3): row i < n of mask[n,F] is drawn in order j = 0..F-1 from
     * sy_rng_key(seed, "expert.dropout", step, micro ? micro[i] : micro0, layer<<32 | tok[i]):
     * mask = uniform < keep ? inv : 0. tok[n] and micro[n] (or NULL) are backend buffers. */
    void (*dropout_mask)(sy_backend_t *be, float *mask, const int32_t *tok,
                         const int32_t *micro, int n, int F, float keep, float inv,
                         uint64_t seed, int64_t step, int micro0, int layer);

    /* ---- expert parallelism: rows on the wire ----
     * wire_put: n fp32 values of src onto the wire at dst: bf16 (RNE) when es = 2, a copy when
     * es = 4. wire_get: the inverse (bf16 widened exactly). dst/src are backend buffers; wire
     * offsets are even, so bf16 elements are aligned. */
    void (*wire_put)(sy_backend_t *be, void *dst, const float *src, size_t n, int es);
    void (*wire_get)(sy_backend_t *be, float *dst, const void *src, size_t n, int es);

    void (*destroy)(sy_backend_t *be);
};

/* The CPU backend. threads = 0: all cores. Also selects OpenBLAS kernels (see cpu_setup.h). */
sy_status sy_backend_cpu_new(int threads, bool bf16, sy_backend_t **out);

/* n activation elements (the backend's alloc_act, or n floats of alloc). */
static inline float *sy_alloc_act(sy_backend_t *be, size_t n) {
    return be->alloc_act ? (float *)be->alloc_act(be, n) : (float *)be->alloc(be, n * sizeof(float));
}
/* The CPU emulation backend (backend_emu.c): the shared host/device kernel bodies
 * (kernels/ headers) run in host loops over a CUDA grid's index space; GEMMs and attention are the
 * CPU backend's. For testing the device kernels' logic without a device; all cores. */
sy_status sy_backend_emu_new(bool bf16, sy_backend_t **out);
/* The backend named by the environment variable SY_BACKEND: "cpu" (or unset / empty) ->
 * sy_backend_cpu_new(threads, bf16), "emu" -> the emulation backend on `threads` threads,
 * "cuda" -> sy_backend_cuda_new(SY_CUDA_DEVICE or 0, bf16); anything else is SY_EINVAL. Either honours SY_BACKEND_POISON=1. For tests and tools that
 * run one suite against several backends. (sy_backend_cpu_new itself also returns the
 * emulation backend when SY_BACKEND=emu, so that suites written for the CPU backend run on it
 * unedited, as SY_BACKEND_POISON=1 does for the poisoned variant.) */
sy_status sy_backend_new_from_env(int threads, bool bf16, sy_backend_t **out);
/* The CUDA backend (src/backend/cuda/backend_cuda.cu) on CUDA device `device`: cuBLAS GEMMs
 * (bf16 inputs with fp32 accumulation when bf16, else fp32 without TF32), the kernel bodies of
 * kernels/ as CUDA kernels, one stream. Fails fast (no hang) with SY_ENOTFOUND and a message
 * naming the device and the reason when there is no driver or no such device; SY_EINVAL when
 * the build has no CUDA (nvcc absent at configure time). After creation a CUDA error (they are
 * sticky) is logged with the op and cudaGetErrorString and the process exits with status
 * SY_CUDA_EXIT: the launcher or scheduler restarts it. docs/architecture.md "cuda". */
#define SY_CUDA_EXIT 70
sy_status sy_backend_cuda_new(int device, bool bf16, sy_backend_t **out);
/* CUDA devices this process can use: >= 0, or -1 when the CUDA runtime cannot start (no
 * driver) or the build has no CUDA; why (if not NULL) gets the reason. Never hangs. */
int sy_backend_cuda_devices(char *why, size_t why_len);
/* true when this build contains the CUDA backend */
bool sy_backend_cuda_built(void);
/* The device's dense bf16 GEMM rate (for benchmarks): C[M,N] (fp32) = A[M,K]·B[K,N] in bf16
 * with fp32 accumulation, plain cuBLAS (cublasGemmEx, the backend's settings), median of
 * `iters` timed runs after 3 warm-ups; TFLOP/s, or a negative value with the error set. */
double sy_backend_cuda_gemm_tflops(int device, int M, int N, int K, int iters);
void sy_backend_destroy(sy_backend_t **self_p);

#endif
