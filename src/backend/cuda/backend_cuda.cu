// The CUDA backend: sy_backend_t (backend.h) over device memory, on one CUDA device and one
// stream. Built as the module libsy_backend_cuda.so (cuda_module_internal.h: it links nothing
// of the project; cuda_loader.c loads it). COMPILED, NEVER YET RUN ON A GPU: tests/gpu/
// device_check.sh is the first check to run on one.
//
//   GEMMs        cuBLAS (cublasGemmEx / cublasGemmStridedBatchedEx), row-major through the
//                usual transpose trick. bf16 mode: A and B converted to bf16 scratch (exact for
//                the bf16-valued activations and weights model spec §4 feeds them; a device flag
//                records any input that was not a bf16 value, reported at destroy), fp32
//                accumulation and output (CUBLAS_COMPUTE_32F), the output rounded to bf16 by a
//                kernel as the CPU emulation rounds it. fp32 mode, and the GEMMs spec §4 keeps in
//                fp32 (the router and LM head, which switch.c / model.c call with bf16 cleared;
//                the plain matmul_bwd, whose dy is the fp32 logits gradient; attention scores and
//                probabilities): CUBLAS_COMPUTE_32F_PEDANTIC, no TF32.
//                The grouped forms run one GEMM per problem (each problem keeps its own shape:
//                the result of the single call, as backend.h promises).
//   Kernels      the shared host/device bodies of backend/kernels/ (kernel_bodies.cuh), one grid
//                thread per index of the emulation backend's loops: the CPU backend's operations
//                in its order, so integer results (route plan) and the fixed-order sums
//                (sumsq_add's 4096-chunks, route_stats' t order, cross-entropy's row order) keep
//                their pinned order. No floating-point atomics anywhere. Attention's causal
//                softmax and its backward are row kernels here (the CPU backend's are vectorised:
//                same formula, other summation order).
//   Determinism  one stream; cuBLAS with a fixed workspace (cublasSetWorkspace), atomics not
//                allowed, default algorithms on fixed shapes: a run repeats bit for bit on the
//                same GPU and library versions.
//   Errors       creation failures are returned (SY_ENOTFOUND naming the device and the cause).
//                Afterwards every CUDA / cuBLAS error is logged with the op that met it and the
//                process exits with SY_CUDA_EXIT: CUDA errors are sticky (the context is lost),
//                so the launcher or the scheduler restarts the worker. SY_CUDA_SYNC=1 makes every
//                op synchronise and check, to name the op that failed (debugging only).
// Thread: one thread drives it (cudaSetDevice is per thread; the backend sets its device at
// creation, and again in alloc/free and the traffic ops, which other threads of the driving
// program may call in turn).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend/backend.h"
#include "base/status.h"
#include "cuda_module_internal.h"
}

#include "kernel_bodies.cuh"

namespace {

// The host's logging (cuda_module_internal.h): this module links nothing of the project.
const sy_cuda_host_api *g_host;

__attribute__((format(printf, 2, 3))) void hlog(int level, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (g_host && g_host->log)
        g_host->log(level, buf);
    else
        fprintf(stderr, "%s\n", buf);
}

enum { LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 };

const int kThreads = 256;                      // threads per block of the 1-D launches
const size_t kCublasWorkspace = (size_t)32 << 20; // fixed cuBLAS workspace (bytes)

struct cuda_be {
    sy_backend_t base; // first: the table the callers see
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    bool sync_each; // SY_CUDA_SYNC=1
    // grown scratch (device): bf16 copies of GEMM inputs, fp32 temporaries, fp64 partials
    uint16_t *bfA, *bfB;
    size_t bfA_n, bfB_n;
    float *tmp;
    size_t tmp_n;
    double *f64;
    size_t f64_n;
    int *inexact; // device flag: a bf16 GEMM input was not a bf16 value
    bool fast16bf; // SY_CUDA_GEMM=fast16bf: fp32 inputs, CUBLAS_COMPUTE_32F_FAST_16BF
    bool grouped;  // the grouped expert GEMMs (SY_CUDA_GROUPED=0: one GEMM per expert)
    void **ptrs;   // device pointer arrays of the grouped GEMMs
    size_t ptrs_n;
    uint64_t tag_jitter, tag_dropout;
};

cuda_be *CB(sy_backend_t *be) { return reinterpret_cast<cuda_be *>(be); }

[[noreturn]] void cuda_die(const char *op, const char *what, const char *msg) {
    hlog(LOG_ERROR, "cuda backend: %s: %s: %s; exiting with status %d (a CUDA error leaves the context "
             "unusable: the launcher or scheduler restarts this process)",
             op, what, msg, SY_CUDA_EXIT);
    fflush(stderr);
    exit(SY_CUDA_EXIT);
}

void ck(cudaError_t e, const char *op, const char *what) {
    if (e != cudaSuccess) cuda_die(op, what, cudaGetErrorString(e));
}

const char *blas_str(cublasStatus_t s) {
    const char *n = cublasGetStatusString(s);
    return n ? n : "unknown cuBLAS status";
}

void ckb(cublasStatus_t s, const char *op, const char *what) {
    if (s != CUBLAS_STATUS_SUCCESS) cuda_die(op, what, blas_str(s));
}

#define CK(op, call) ck((call), (op), #call)
#define CKB(op, call) ckb((call), (op), #call)

// After the launches of an op: launch errors now; with SY_CUDA_SYNC=1 also execution errors.
void done(cuda_be *c, const char *op) {
    ck(cudaGetLastError(), op, "kernel launch");
    if (c->sync_each) ck(cudaStreamSynchronize(c->stream), op, "cudaStreamSynchronize (SY_CUDA_SYNC)");
}

unsigned blocks(size_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

// Launch a 1-D body wrapper over n indices on the backend's stream (nothing when n == 0).
#define LAUNCH(c, n, kern, ...)                                                   \
    do {                                                                          \
        const size_t n_ = (size_t)(n);                                            \
        if (n_) kern<<<blocks(n_), kThreads, 0, (c)->stream>>>(__VA_ARGS__);      \
    } while (0)
// A one-thread launch (the serial bodies: offsets, fixed-order sums).
#define LAUNCH1(c, kern, ...) kern<<<1, 1, 0, (c)->stream>>>(__VA_ARGS__)

// Device scratch of at least `n` elements of T in *p (grown, kept; growth synchronises).
template <typename T> T *grow(cuda_be *c, T **p, size_t *cap, size_t n, const char *op) {
    if (n <= *cap && *p) return *p;
    ck(cudaStreamSynchronize(c->stream), op, "cudaStreamSynchronize (scratch growth)");
    if (*p) ck(cudaFree(*p), op, "cudaFree (scratch)");
    *p = nullptr;
    *cap = 0;
    size_t want = n < 1024 ? 1024 : n;
    cudaError_t e = cudaMalloc((void **)p, want * sizeof(T));
    if (e != cudaSuccess) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s (%zu bytes of scratch)", cudaGetErrorString(e),
                 want * sizeof(T));
        cuda_die(op, "cudaMalloc", msg);
    }
    *cap = want;
    return *p;
}

// ---- kernels of this backend (not shared bodies) ----

// dst[i] = bf16(src[i]) (RNE, the bodies' rounding); *inexact = 1 when src[i] is not a bf16
// value (a plain store of the same value by every writer: no atomics needed).
__global__ void g_to_bf16(size_t n, uint16_t *dst, const float *src, int *inexact) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = src[i];
    const uint16_t h = sy_k_f32_to_bf16(v);
    dst[i] = h;
    if (sy_k_bf16_to_f32(h) != v && v == v) *inexact = 1;
}

// Causal softmax of rows r < R of [T,T] blocks (att in place): row t = r mod T keeps s <= t,
// max-subtracted, sy_k_expf (the CPU backend's exp), serial sums; s > t zeroed.
__global__ void g_causal_softmax(size_t R, float *att, int T) {
    const size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const int t = (int)(r % (size_t)T);
    float *a = att + r * (size_t)T;
    float mx = -INFINITY;
    for (int s = 0; s <= t; s++) mx = a[s] > mx ? a[s] : mx;
    float sum = 0.0f;
    for (int s = 0; s <= t; s++) {
        a[s] = sy_k_expf(a[s] - mx);
        sum += a[s];
    }
    const float inv = 1.0f / sum;
    for (int s = 0; s <= t; s++) a[s] *= inv;
    for (int s = t + 1; s < T; s++) a[s] = 0.0f;
}

// dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale in place over dP, rows r < R (row t = r mod T)
__global__ void g_softmax_bwd(size_t R, float *dp, const float *p, int T, float scale) {
    const size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const int t = (int)(r % (size_t)T);
    float *d = dp + r * (size_t)T;
    const float *pr = p + r * (size_t)T;
    float dot = 0.0f;
    for (int s = 0; s <= t; s++) dot += pr[s] * d[s];
    for (int s = 0; s <= t; s++) d[s] = pr[s] * (d[s] - dot) * scale;
    for (int s = t + 1; s < T; s++) d[s] = 0.0f;
}

// ---- GEMMs ----

// GEMM input modes: fp32 without TF32; bf16 (uint16) arrays with fp32 accumulation; fp32
// arrays that hold bf16 values, multiplied by cuBLAS in bf16 with fp32 accumulation
// (CUBLAS_COMPUTE_32F_FAST_16BF: its down-conversion is exact for bf16 values, whatever its
// rounding; SY_CUDA_GEMM=fast16bf selects it for the bf16 GEMMs, to be measured against the
// explicit conversion, which stays the default until a GPU run has compared them).
enum { G_F32 = 0, G_BF16 = 1, G_FAST = 2 };

// The mode of this backend's bf16 GEMMs
int bfm(const cuda_be *c) { return c->fast16bf ? G_FAST : G_BF16; }

// Row-major C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C (A stored [K,M] when ta, B
// stored [N,K] when tb), as column-major Cᵀ = op(B)ᵀ · op(A)ᵀ, inputs of `mode`, fp32 output.
// batch > 1: strided.
void gemm(cuda_be *c, const char *op, bool ta, bool tb, int M, int N, int K, float alpha,
          const void *A, int lda, long long sA, const void *B, int ldb, long long sB, float beta,
          float *C, int ldc, long long sC, int batch, int mode) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    const cudaDataType_t t = mode == G_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t ct = mode == G_BF16   ? CUBLAS_COMPUTE_32F
                                   : mode == G_FAST ? CUBLAS_COMPUTE_32F_FAST_16BF
                                                    : CUBLAS_COMPUTE_32F_PEDANTIC;
    const cublasOperation_t opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batch == 1)
        CKB(op, cublasGemmEx(c->blas, opB, opA, N, M, K, &alpha, B, t, ldb, A, t, lda, &beta, C,
                             CUDA_R_32F, ldc, ct, CUBLAS_GEMM_DEFAULT));
    else
        CKB(op, cublasGemmStridedBatchedEx(c->blas, opB, opA, N, M, K, &alpha, B, t, ldb, sB, A, t,
                                           lda, sA, &beta, C, CUDA_R_32F, ldc, sC, batch, ct,
                                           CUBLAS_GEMM_DEFAULT));
}

// A single (unbatched) row-major GEMM.
void gemm1(cuda_be *c, const char *op, bool ta, bool tb, int M, int N, int K, float alpha,
           const void *A, int lda, const void *B, int ldb, float beta, float *C, int ldc,
           int mode) {
    gemm(c, op, ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, mode);
}

// The input of a bf16 GEMM: a bf16 copy of n floats in scratch slot A or B, or (fast16bf) the
// fp32 array itself
const void *to_bf16(cuda_be *c, const char *op, const float *src, size_t n, bool slotA) {
    if (c->fast16bf) return src;
    uint16_t *dst = slotA ? grow(c, &c->bfA, &c->bfA_n, n, op) : grow(c, &c->bfB, &c->bfB_n, n, op);
    LAUNCH(c, n, g_to_bf16, n, dst, src, c->inexact);
    return dst;
}

void round_if(cuda_be *c, float *x, size_t n, bool bf16) {
    if (bf16) LAUNCH(c, n, sy_g_round, n, x);
}

// ---- memory and traffic ----

void set_dev(cuda_be *c, const char *op) { ck(cudaSetDevice(c->device), op, "cudaSetDevice"); }

void *cu_alloc(sy_backend_t *be, size_t bytes) {
    cuda_be *c = CB(be);
    set_dev(c, "alloc");
    void *p = nullptr;
    size_t sz = bytes ? (bytes + 255) & ~(size_t)255 : 256;
    cudaError_t e = cudaMalloc(&p, sz);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); // out of memory is not sticky: clear it, report NULL
        hlog(LOG_ERROR, "cuda backend: alloc of %zu bytes on device %d: %s", bytes, c->device,
                 cudaGetErrorString(e));
        return nullptr;
    }
    ck(e, "alloc", "cudaMalloc");
    CK("alloc", cudaMemsetAsync(p, 0, sz, c->stream));
    done(c, "alloc");
    return p;
}

void cu_free(sy_backend_t *be, void *p) {
    if (!p) return;
    cuda_be *c = CB(be);
    set_dev(c, "free");
    CK("free", cudaStreamSynchronize(c->stream));
    CK("free", cudaFree(p));
}

void cu_upload(sy_backend_t *be, void *dst, const void *src_host, size_t bytes) {
    if (!bytes) return;
    cuda_be *c = CB(be);
    set_dev(c, "upload");
    CK("upload", cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, c->stream));
    CK("upload", cudaStreamSynchronize(c->stream)); // the host buffer may be reused on return
}

void cu_download(sy_backend_t *be, void *dst_host, const void *src, size_t bytes) {
    if (!bytes) return;
    cuda_be *c = CB(be);
    set_dev(c, "download");
    CK("download", cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    CK("download", cudaStreamSynchronize(c->stream));
}

void cu_copy(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    cuda_be *c = CB(be);
    CK("copy", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
    done(c, "copy");
}

void cu_zero(sy_backend_t *be, void *p, size_t bytes) {
    if (!bytes) return;
    cuda_be *c = CB(be);
    CK("zero", cudaMemsetAsync(p, 0, bytes, c->stream));
    done(c, "zero");
}

void cu_sync(sy_backend_t *be) {
    cuda_be *c = CB(be);
    set_dev(c, "sync");
    CK("sync", cudaStreamSynchronize(c->stream));
}

void *cu_host_view(sy_backend_t *be, void *p) {
    (void)be;
    (void)p;
    return nullptr; // device memory: callers stage through download/upload
}

// ---- parameter / gradient / optimizer path ----

void cu_acc_add_f32(sy_backend_t *be, double *acc, const float *g, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_acc_add_f32, n, acc, g);
    done(c, "acc_add_f32");
}

void cu_acc_to_f32(sy_backend_t *be, float *g, const double *acc, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_acc_to_f32, n, g, acc);
    done(c, "acc_to_f32");
}

// chunks of SY_K_SUMSQ_CHUNK summed in order (one thread each), the chunk sums in order (one
// thread): backend.h's order
void cu_sumsq_add(sy_backend_t *be, double *out, const float *x, size_t n) {
    cuda_be *c = CB(be);
    if (!n) return;
    const size_t nc = (n + SY_K_SUMSQ_CHUNK - 1) / SY_K_SUMSQ_CHUNK;
    double *part = grow(c, &c->f64, &c->f64_n, nc, "sumsq_add");
    LAUNCH(c, nc, sy_g_sumsq_chunk, nc, part, x, n);
    LAUNCH1(c, sy_g_sum_f64, out, part, nc);
    done(c, "sumsq_add");
}

void cu_scale(sy_backend_t *be, float *x, size_t n, float k) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_scale, n, x, k);
    done(c, "scale");
}

void cu_adamw(sy_backend_t *be, float *p, const float *g, float *m, float *v, size_t n,
              float decay, float b1, float b2, float step_size, float inv_sqrt_bc2, float eps) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_adamw, n, p, g, m, v, decay, b1, b2, step_size, inv_sqrt_bc2, eps);
    done(c, "adamw");
}

void cu_round_bf16(sy_backend_t *be, float *x, size_t n) {
    cuda_be *c = CB(be);
    round_if(c, x, n, be->bf16);
    done(c, "round_bf16");
}

// ---- activations ----

void cu_embed_fwd(sy_backend_t *be, float *x, const int32_t *tok, const float *wte,
                  const float *wpe, int N, int T, int D) {
    cuda_be *c = CB(be);
    const size_t n = (size_t)N * D;
    LAUNCH(c, n, sy_g_embed_fwd, n, x, tok, wte, wpe, T, D, be->bf16);
    done(c, "embed_fwd");
}

void cu_embed_bwd(sy_backend_t *be, float *dwte, float *dwpe, const float *dx,
                  const int32_t *tok, int N, int T, int D) {
    cuda_be *c = CB(be);
    if (N <= 0) return;
    LAUNCH(c, D, sy_g_embed_bwd_col, dwte, dwpe, dx, tok, N, T, D);
    done(c, "embed_bwd");
}

void cu_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N, int in,
                   int out) {
    cuda_be *c = CB(be);
    if (N <= 0) return;
    if (be->bf16) {
        const void *xb = to_bf16(c, "matmul_fwd", x, (size_t)N * in, true);
        const void *wb = to_bf16(c, "matmul_fwd", W, (size_t)out * in, false);
        gemm1(c, "matmul_fwd", false, true, N, out, in, 1.0f, xb, in, wb, in, 0.0f, y, out, bfm(c));
        round_if(c, y, (size_t)N * out, true);
    } else {
        gemm1(c, "matmul_fwd", false, true, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out, G_F32);
    }
    done(c, "matmul_fwd");
}

// The plain backward: fp32 GEMMs in both modes (its callers are the LM head, whose dy is the
// fp32 logits gradient, and the router, fp32 by spec §4), dx rounded as the CPU emulation does.
void cu_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy, const float *x,
                   const float *W, int N, int in, int out, bool accumulate_dx) {
    cuda_be *c = CB(be);
    if (N <= 0) return;
    const char *op = "matmul_bwd";
    const size_t nx = (size_t)N * in;
    if (dx) {
        if (accumulate_dx && be->bf16) {
            // dx = round(dx + round(dy · W)): the product is rounded before the add
            float *t = grow(c, &c->tmp, &c->tmp_n, nx, op);
            gemm1(c, op, false, false, N, in, out, 1.0f, dy, out, W, in, 0.0f, t, in, G_F32);
            LAUNCH(c, nx, sy_g_round, nx, t);
            LAUNCH(c, nx, sy_g_add, nx, dx, t, true);
        } else {
            gemm1(c, op, false, false, N, in, out, 1.0f, dy, out, W, in,
                  accumulate_dx ? 1.0f : 0.0f, dx, in, G_F32);
            round_if(c, dx, nx, be->bf16);
        }
    }
    gemm1(c, op, true, false, out, in, N, 1.0f, dy, out, x, in, 1.0f, dW, in, G_F32);
    done(c, op);
}

// dx = dy · W (rounded in bf16 mode); dW = dyᵀ · x (fp32 scratch); dW64 += dW
void acc64_one(cuda_be *c, bool bf16, float *dx, float *dW, double *dW64, const float *dy,
               const float *x, const float *W, int N, int in, int out) {
    const char *op = "matmul_bwd_acc64";
    if (N <= 0) return;
    if (bf16) {
        const void *dyb = to_bf16(c, op, dy, (size_t)N * out, true);
        const void *wb = to_bf16(c, op, W, (size_t)out * in, false);
        gemm1(c, op, false, false, N, in, out, 1.0f, dyb, out, wb, in, 0.0f, dx, in, bfm(c));
        round_if(c, dx, (size_t)N * in, true);
        // slot B is free again once the dx GEMM is enqueued (one stream)
        const void *xb = to_bf16(c, op, x, (size_t)N * in, false);
        gemm1(c, op, true, false, out, in, N, 1.0f, dyb, out, xb, in, 0.0f, dW, in, bfm(c));
    } else {
        gemm1(c, op, false, false, N, in, out, 1.0f, dy, out, W, in, 0.0f, dx, in, G_F32);
        gemm1(c, op, true, false, out, in, N, 1.0f, dy, out, x, in, 0.0f, dW, in, G_F32);
    }
    const size_t nw = (size_t)out * in;
    LAUNCH(c, nw, sy_g_acc_add_f32, nw, dW64, dW);
}

void cu_matmul_bwd_acc64(sy_backend_t *be, float *dx, float *dW, double *dW64, const float *dy,
                         const float *x, const float *W, int N, int in, int out) {
    cuda_be *c = CB(be);
    acc64_one(c, be->bf16, dx, dW, dW64, dy, x, W, N, in, out);
    done(c, "matmul_bwd_acc64");
}

// ---- grouped expert GEMMs (SY_CUDA_GROUPED, default on) ----
// The grouped forms in a constant number of launches whatever the number of experts: one
// segmented conversion kernel for all inputs, one cublasGemmGroupedBatchedEx per GEMM kind (each
// problem its own group of one: its own m), one segmented rounding / fp64-accumulation kernel.
// Every problem computes what the single call computes (same inputs, same cuBLAS arithmetic
// per problem; cuBLAS may pick another kernel for a grouped call than for the single one, so
// results are compared with tolerances, test_backend_cuda "group *"). If cuBLAS reports the
// grouped call unsupported, the backend logs it once and uses the per-problem loop from then on.

const int kMaxSeg = 128; // segments per segmented launch (64 experts x 2 inputs)

struct Segs {
    int n;
    int kind; // 0: dst(u16) = bf16(src) and the inexact flag; 1: dst(f32) = round(dst); 2: dst(f64) += src(f32)
    size_t start[kMaxSeg + 1];
    const float *src[kMaxSeg];
    void *dst[kMaxSeg];
};

__global__ void g_segs(Segs s, int *inexact) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= s.start[s.n]) return;
    int lo = 0, hi = s.n - 1; // the segment: start[lo] <= i < start[lo + 1]
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s.start[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    const size_t k = i - s.start[lo];
    if (s.kind == 0) {
        const float v = s.src[lo][k];
        const uint16_t h = sy_k_f32_to_bf16(v);
        static_cast<uint16_t *>(s.dst[lo])[k] = h;
        if (sy_k_bf16_to_f32(h) != v && v == v) *inexact = 1;
    } else if (s.kind == 1) {
        float *d = static_cast<float *>(s.dst[lo]);
        d[k] = sy_k_round_bf16(d[k]);
    } else {
        static_cast<double *>(s.dst[lo])[k] += s.src[lo][k];
    }
}

// Collects segments and launches them (flushing when full).
struct SegRun {
    cuda_be *c;
    Segs s;
    SegRun(cuda_be *cc, int kind) : c(cc) {
        memset(&s, 0, sizeof s);
        s.kind = kind;
    }
    void add(const float *src, void *dst, size_t len) {
        if (!len) return;
        if (s.n == kMaxSeg) flush();
        s.src[s.n] = src;
        s.dst[s.n] = dst;
        s.start[s.n + 1] = s.start[s.n] + len;
        s.n++;
    }
    void flush() {
        if (s.n) g_segs<<<blocks(s.start[s.n]), kThreads, 0, c->stream>>>(s, c->inexact);
        s.n = 0;
        s.start[0] = 0;
    }
};

// One row-major problem (gemm()'s arguments)
struct Prob {
    bool ta, tb;
    int M, N, K;
    const void *A;
    int lda;
    const void *B;
    int ldb;
    float beta;
    float *C;
    int ldc;
};

// n problems with alpha 1: grouped when possible, else one gemm1 each
void gemm_group(cuda_be *c, const char *op, const Prob *p, int n, int mode) {
    if (n <= 0) return;
    if (!c->grouped || n == 1) {
        for (int i = 0; i < n; i++)
            gemm1(c, op, p[i].ta, p[i].tb, p[i].M, p[i].N, p[i].K, 1.0f, p[i].A, p[i].lda, p[i].B,
                  p[i].ldb, p[i].beta, p[i].C, p[i].ldc, mode);
        return;
    }
    // column-major Cᵀ = op(B)ᵀ op(A)ᵀ per problem, as gemm() does
    cublasOperation_t ta[kMaxSeg], tb[kMaxSeg];
    int m[kMaxSeg], nn[kMaxSeg], k[kMaxSeg], lda[kMaxSeg], ldb[kMaxSeg], ldc[kMaxSeg], gs[kMaxSeg];
    float alpha[kMaxSeg], beta[kMaxSeg];
    const void *ptr[3 * kMaxSeg];
    for (int i = 0; i < n; i++) {
        ta[i] = p[i].tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        tb[i] = p[i].ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[i] = p[i].N, nn[i] = p[i].M, k[i] = p[i].K;
        lda[i] = p[i].ldb, ldb[i] = p[i].lda, ldc[i] = p[i].ldc;
        alpha[i] = 1.0f, beta[i] = p[i].beta, gs[i] = 1;
        ptr[i] = p[i].B, ptr[n + i] = p[i].A, ptr[2 * n + i] = p[i].C;
    }
    void **dptr = reinterpret_cast<void **>(grow(c, &c->ptrs, &c->ptrs_n, (size_t)3 * n, op));
    CK(op, cudaMemcpyAsync(dptr, ptr, sizeof(void *) * 3 * (size_t)n, cudaMemcpyHostToDevice, c->stream));
    const cudaDataType_t t = mode == G_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t ct = mode == G_BF16   ? CUBLAS_COMPUTE_32F
                                   : mode == G_FAST ? CUBLAS_COMPUTE_32F_FAST_16BF
                                                    : CUBLAS_COMPUTE_32F_PEDANTIC;
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        c->blas, ta, tb, m, nn, k, alpha, (const void *const *)dptr, t, lda,
        (const void *const *)(dptr + n), t, ldb, beta, dptr + 2 * n, CUDA_R_32F, ldc, n, gs, ct);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        hlog(LOG_WARN, "cuda backend: %s: cublasGemmGroupedBatchedEx: %s for these types; using one "
             "GEMM per expert from now on", op, blas_str(st));
        c->grouped = false;
        gemm_group(c, op, p, n, mode);
        return;
    }
    ckb(st, op, "cublasGemmGroupedBatchedEx");
}

// The grouped forward: he = xe·W1ᵀ for every expert with rows, in a few launches
void group_fwd(cuda_be *c, bool bf16, float *const *y, const float *const *x,
               const float *const *W, const int *N, int n, int in, int out) {
    const char *op = "matmul_fwd_group";
    Prob p[kMaxSeg / 2];
    int idx[kMaxSeg / 2], na = 0;
    size_t nx = 0;
    for (int i = 0; i < n; i++)
        if (N[i] > 0) idx[na++] = i, nx += (size_t)N[i] * in;
    if (!na) return;
    const size_t nw = (size_t)out * in;
    const void *xb[kMaxSeg / 2], *wb[kMaxSeg / 2];
    if (bf16 && !c->fast16bf) {
        uint16_t *A = grow(c, &c->bfA, &c->bfA_n, nx, op);
        uint16_t *B = grow(c, &c->bfB, &c->bfB_n, nw * na, op);
        SegRun cv(c, 0);
        size_t off = 0;
        for (int j = 0; j < na; j++) {
            const int i = idx[j];
            cv.add(x[i], A + off, (size_t)N[i] * in);
            cv.add(W[i], B + nw * j, nw);
            xb[j] = A + off, wb[j] = B + nw * j;
            off += (size_t)N[i] * in;
        }
        cv.flush();
    } else {
        for (int j = 0; j < na; j++) xb[j] = x[idx[j]], wb[j] = W[idx[j]];
    }
    for (int j = 0; j < na; j++) {
        const int i = idx[j];
        p[j] = Prob{false, true, N[i], out, in, xb[j], in, wb[j], in, 0.0f, y[i], out};
    }
    gemm_group(c, op, p, na, bf16 ? bfm(c) : G_F32);
    if (bf16) {
        SegRun rd(c, 1);
        for (int j = 0; j < na; j++) rd.add(nullptr, y[idx[j]], (size_t)N[idx[j]] * out);
        rd.flush();
    }
}

// The grouped backward (dW64[i] set: acc64; NULL: matmul_bwd with accumulate_dx false)
void group_bwd(cuda_be *c, bool bf16, float *const *dx, float *const *dW, double *const *dW64,
               const float *const *dy, const float *const *x, const float *const *W, const int *N,
               int n, int in, int out) {
    const char *op = "matmul_bwd_group";
    Prob p[kMaxSeg / 2] = {}; /* zeroed: gcc's -Wmaybe-uninitialized (with -fsanitize) cannot see the fill loop's bound */
    int idx[kMaxSeg / 2], na = 0;
    size_t nrows = 0;
    for (int i = 0; i < n; i++)
        if (N[i] > 0) idx[na++] = i, nrows += (size_t)N[i];
    if (!na) return;
    const size_t nw = (size_t)out * in;
    const void *dyb[kMaxSeg / 2], *xb[kMaxSeg / 2], *wb[kMaxSeg / 2];
    if (bf16 && !c->fast16bf) {
        uint16_t *A = grow(c, &c->bfA, &c->bfA_n, nrows * (size_t)(out + in), op);
        uint16_t *B = grow(c, &c->bfB, &c->bfB_n, nw * na, op);
        SegRun cv(c, 0);
        size_t off = 0;
        for (int j = 0; j < na; j++) {
            const int i = idx[j];
            dyb[j] = A + off;
            cv.add(dy[i], A + off, (size_t)N[i] * out);
            off += (size_t)N[i] * out;
            xb[j] = A + off;
            cv.add(x[i], A + off, (size_t)N[i] * in);
            off += (size_t)N[i] * in;
            wb[j] = B + nw * j;
            cv.add(W[i], B + nw * j, nw);
        }
        cv.flush();
    } else {
        for (int j = 0; j < na; j++) dyb[j] = dy[idx[j]], xb[j] = x[idx[j]], wb[j] = W[idx[j]];
    }
    const int mode = bf16 ? bfm(c) : G_F32;
    // dx = dy · W
    for (int j = 0; j < na; j++) {
        const int i = idx[j];
        p[j] = Prob{false, false, N[i], in, out, dyb[j], out, wb[j], in, 0.0f, dx[i], in};
    }
    gemm_group(c, op, p, na, mode);
    if (bf16) {
        SegRun rd(c, 1);
        for (int j = 0; j < na; j++) rd.add(nullptr, dx[idx[j]], (size_t)N[idx[j]] * in);
        rd.flush();
    }
    // dW = dyᵀ · x: fp32 scratch (acc64) or += (matmul_bwd)
    for (int j = 0; j < na; j++) {
        const int i = idx[j];
        const bool acc = dW64 && dW64[i];
        p[j] = Prob{true, false, out, in, N[i], dyb[j], out, xb[j], in, acc ? 0.0f : 1.0f, dW[i], in};
    }
    gemm_group(c, op, p, na, mode);
    SegRun ac(c, 2);
    for (int j = 0; j < na; j++)
        if (dW64 && dW64[idx[j]]) ac.add(dW[idx[j]], dW64[idx[j]], nw);
    ac.flush();
}

void cu_matmul_fwd_group(sy_backend_t *be, float *const *y, const float *const *x,
                         const float *const *W, const int *N, int n, int in, int out) {
    cuda_be *c = CB(be);
    if (c->grouped) {
        for (int i0 = 0; i0 < n; i0 += kMaxSeg / 2) // slices of 64 problems (same results)
            group_fwd(c, be->bf16, y + i0, x + i0, W + i0, N + i0,
                      n - i0 < kMaxSeg / 2 ? n - i0 : kMaxSeg / 2, in, out);
        done(c, "matmul_fwd_group");
        return;
    }
    for (int i = 0; i < n; i++) cu_matmul_fwd(be, y[i], x[i], W[i], N[i], in, out);
}

void cu_matmul_bwd_group(sy_backend_t *be, float *const *dx, float *const *dW,
                         double *const *dW64, const float *const *dy, const float *const *x,
                         const float *const *W, const int *N, int n, int in, int out) {
    cuda_be *c = CB(be);
    if (c->grouped) {
        for (int i0 = 0; i0 < n; i0 += kMaxSeg / 2)
            group_bwd(c, be->bf16, dx + i0, dW + i0, dW64 ? dW64 + i0 : nullptr, dy + i0, x + i0,
                      W + i0, N + i0, n - i0 < kMaxSeg / 2 ? n - i0 : kMaxSeg / 2, in, out);
        done(c, "matmul_bwd_group");
        return;
    }
    for (int i = 0; i < n; i++) {
        if (N[i] <= 0) continue;
        if (dW64 && dW64[i])
            acc64_one(c, be->bf16, dx[i], dW[i], dW64[i], dy[i], x[i], W[i], N[i], in, out);
        else if (be->bf16) {
            // matmul_bwd with accumulate_dx false, the bf16 GEMMs of the expert path
            const char *op = "matmul_bwd_group";
            const void *dyb = to_bf16(c, op, dy[i], (size_t)N[i] * out, true);
            const void *wb = to_bf16(c, op, W[i], (size_t)out * in, false);
            gemm1(c, op, false, false, N[i], in, out, 1.0f, dyb, out, wb, in, 0.0f, dx[i], in, bfm(c));
            round_if(c, dx[i], (size_t)N[i] * in, true);
            const void *xb = to_bf16(c, op, x[i], (size_t)N[i] * in, false);
            gemm1(c, op, true, false, out, in, N[i], 1.0f, dyb, out, xb, in, 1.0f, dW[i], in, bfm(c));
        } else {
            cu_matmul_bwd(be, dx[i], dW[i], dy[i], x[i], W[i], N[i], in, out, false);
        }
    }
    done(c, "matmul_bwd_group");
}

void cu_layernorm_fwd(sy_backend_t *be, float *y, float *mean, float *rstd, const float *x,
                      const float *w, int N, int D) {
    cuda_be *c = CB(be);
    LAUNCH(c, N, sy_g_layernorm_fwd_row, N, y, mean, rstd, x, w, D, be->bf16);
    done(c, "layernorm_fwd");
}

void cu_layernorm_bwd(sy_backend_t *be, float *dx, float *dw, const float *dy, const float *x,
                      const float *w, const float *mean, const float *rstd, int N, int D) {
    cuda_be *c = CB(be);
    if (N <= 0) return;
    LAUNCH(c, N, sy_g_layernorm_bwd_dx_row, N, dx, dy, x, w, mean, rstd, D, be->bf16);
    LAUNCH(c, D, sy_g_layernorm_bwd_dw_col, dw, dy, x, mean, rstd, N, D);
    done(c, "layernorm_bwd");
}

// Per batch b, strided-batched over the H heads (q, k, v of head h at column h·hd of the qkv
// rows): S = scale · q kᵀ, the causal softmax, out = P v. fp32 GEMMs (scores and probabilities
// stay fp32, spec §4); out rounded in bf16 mode.
void cu_attention_fwd(sy_backend_t *be, float *out, float *att, const float *qkv, int B, int T,
                      int D, int H) {
    cuda_be *c = CB(be);
    const char *op = "attention_fwd";
    const int hd = D / H, C3 = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {
        const float *q = qkv + (size_t)b * T * C3, *k = q + D;
        float *a = att + (size_t)b * H * TT;
        gemm(c, op, false, true, T, T, hd, scale, q, C3, hd, k, C3, hd, 0.0f, a, T, TT, H, G_F32);
    }
    const size_t R = (size_t)B * H * T;
    LAUNCH(c, R, g_causal_softmax, R, att, T);
    for (int b = 0; b < B; b++) {
        const float *v = qkv + (size_t)b * T * C3 + 2 * D;
        const float *a = att + (size_t)b * H * TT;
        gemm(c, op, false, false, T, hd, T, 1.0f, a, T, TT, v, C3, hd, 0.0f,
             out + (size_t)b * T * D, D, hd, H, G_F32);
    }
    round_if(c, out, (size_t)B * T * D, be->bf16);
    done(c, op);
}

void cu_attention_bwd(sy_backend_t *be, float *dqkv, const float *dout, const float *att,
                      const float *qkv, int B, int T, int D, int H) {
    cuda_be *c = CB(be);
    const char *op = "attention_bwd";
    const int hd = D / H, C3 = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long TT = (long long)T * T;
    float *dp = grow(c, &c->tmp, &c->tmp_n, (size_t)H * TT, op);
    for (int b = 0; b < B; b++) {
        const size_t base = (size_t)b * T * C3;
        const float *q = qkv + base, *k = q + D, *v = q + 2 * D;
        float *dq = dqkv + base, *dk = dq + D, *dv = dq + 2 * D;
        const float *dO = dout + (size_t)b * T * D;
        const float *p = att + (size_t)b * H * TT;
        // dP = dO vᵀ ; dv = Pᵀ dO
        gemm(c, op, false, true, T, T, hd, 1.0f, dO, D, hd, v, C3, hd, 0.0f, dp, T, TT, H, G_F32);
        gemm(c, op, true, false, T, hd, T, 1.0f, p, T, TT, dO, D, hd, 0.0f, dv, C3, hd, H, G_F32);
        const size_t R = (size_t)H * T;
        LAUNCH(c, R, g_softmax_bwd, R, dp, p, T, scale);
        // dq = dS k ; dk = dSᵀ q
        gemm(c, op, false, false, T, hd, T, 1.0f, dp, T, TT, k, C3, hd, 0.0f, dq, C3, hd, H, G_F32);
        gemm(c, op, true, false, T, hd, T, 1.0f, dp, T, TT, q, C3, hd, 0.0f, dk, C3, hd, H, G_F32);
    }
    round_if(c, dqkv, (size_t)B * T * C3, be->bf16);
    done(c, op);
}

void cu_gelu_fwd(sy_backend_t *be, float *y, const float *x, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_gelu_fwd, n, y, x, be->bf16);
    done(c, "gelu_fwd");
}

void cu_gelu_bwd(sy_backend_t *be, float *dx, const float *dy, const float *x, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_gelu_bwd, n, dx, dy, x, be->bf16);
    done(c, "gelu_bwd");
}

void cu_add_inplace(sy_backend_t *be, float *y, const float *x, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_add, n, y, x, be->bf16);
    done(c, "add_inplace");
}

void cu_mul_inplace(sy_backend_t *be, float *x, const float *mask, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_mul, n, x, mask, be->bf16);
    done(c, "mul_inplace");
}

// per-row losses (one thread per row), their sum in row order (one thread), downloaded
double xent(sy_backend_t *be, float *d, const float *logits, const int32_t *targets, int N,
            int V, float scale, const char *op) {
    cuda_be *c = CB(be);
    if (N <= 0) return 0.0;
    double *loss = grow(c, &c->f64, &c->f64_n, (size_t)N + 1, op);
    double *total = loss + N;
    CK(op, cudaMemsetAsync(total, 0, sizeof(double), c->stream));
    LAUNCH(c, N, sy_g_xent_row, N, loss, d, logits, targets, V, scale);
    LAUNCH1(c, sy_g_sum_f64, total, loss, (size_t)N);
    done(c, op);
    double h = 0.0;
    CK(op, cudaMemcpyAsync(&h, total, sizeof h, cudaMemcpyDeviceToHost, c->stream));
    CK(op, cudaStreamSynchronize(c->stream));
    return h;
}

double cu_xent_fwd_bwd(sy_backend_t *be, float *dlogits, const float *logits,
                       const int32_t *targets, int N, int V, float scale) {
    return xent(be, dlogits, logits, targets, N, V, scale, "xent_fwd_bwd");
}

double cu_xent_fwd(sy_backend_t *be, const float *logits, const int32_t *targets, int N, int V) {
    return xent(be, nullptr, logits, targets, N, V, 0.0f, "xent_fwd");
}

// ---- Switch layer ----

void cu_gather_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx, int n,
                    int D) {
    cuda_be *c = CB(be);
    const size_t m = (size_t)(n > 0 ? n : 0) * D;
    LAUNCH(c, m, sy_g_gather, m, dst, src, idx, D);
    done(c, "gather_rows");
}

void cu_scatter_rows_scaled(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                            const float *scale, int n, int D) {
    cuda_be *c = CB(be);
    const size_t m = (size_t)(n > 0 ? n : 0) * D;
    LAUNCH(c, m, sy_g_scatter_scaled, m, dst, src, idx, scale, D, be->bf16);
    done(c, "scatter_rows_scaled");
}

void cu_scatter_add_rows(sy_backend_t *be, float *dst, const float *src, const int32_t *idx,
                         int n, int D) {
    cuda_be *c = CB(be);
    const size_t m = (size_t)(n > 0 ? n : 0) * D;
    LAUNCH(c, m, sy_g_scatter_add, m, dst, src, idx, D, be->bf16);
    done(c, "scatter_add_rows");
}

void cu_gather_dot_scale(sy_backend_t *be, float *dot, float *out, const float *a,
                         const float *b, const int32_t *idx, const float *scale, int n, int D) {
    cuda_be *c = CB(be);
    LAUNCH(c, n > 0 ? n : 0, sy_g_gather_dot_scale_row, n, dot, out, a, b, idx, scale, D,
           be->bf16);
    done(c, "gather_dot_scale");
}

void cu_router_fwd(sy_backend_t *be, float *probs, int32_t *expert, float *gate, float *lse,
                   const float *logits, int N, int E) {
    cuda_be *c = CB(be);
    LAUNCH(c, N > 0 ? N : 0, sy_g_router_fwd_row, N, probs, expert, gate, lse, logits, E);
    done(c, "router_fwd");
}

void cu_router_bwd(sy_backend_t *be, float *dlogits, const float *probs, const int32_t *expert,
                   const float *gamma, const float *lse, const float *f, float aux_scale,
                   float z_scale, int N, int E) {
    cuda_be *c = CB(be);
    LAUNCH(c, N > 0 ? N : 0, sy_g_router_bwd_row, N, dlogits, probs, expert, gamma, lse, f,
           aux_scale, z_scale, E);
    done(c, "router_bwd");
}

void cu_jitter_fwd(sy_backend_t *be, float *u, float *xr, const float *h, int G, int D, float eps,
                   uint64_t seed, int64_t step, int micro, int layer) {
    cuda_be *c = CB(be);
    const size_t n = (size_t)(G > 0 ? G : 0) * D;
    LAUNCH(c, n, sy_g_jitter_fwd, n, u, xr, h, D, eps, seed, c->tag_jitter, step, micro, layer);
    done(c, "jitter_fwd");
}

void cu_jitter_bwd(sy_backend_t *be, float *dh, const float *g, const float *u, size_t n) {
    cuda_be *c = CB(be);
    LAUNCH(c, n, sy_g_jitter_bwd, n, dh, g, u);
    done(c, "jitter_bwd");
}

// The integer scans of the bodies: one thread per expert walking the tokens in order (exact;
// G·E steps in all, microseconds at Switch shapes), offsets on one thread, slots per token.
void cu_route_plan(sy_backend_t *be, int32_t *counts, int32_t *kept, int32_t *offsets,
                   int32_t *order, int32_t *slot, float *gk, const int32_t *expert,
                   const float *gate, int G, int E, int C) {
    cuda_be *c = CB(be);
    LAUNCH(c, E > 0 ? E : 0, sy_g_route_count, E, counts, slot, expert, G);
    LAUNCH1(c, sy_g_route_offsets, kept, offsets, counts, E, C);
    LAUNCH(c, G > 0 ? G : 0, sy_g_route_slot, G, order, slot, gk, expert, gate, offsets, C);
    done(c, "route_plan");
}

void cu_route_stats(sy_backend_t *be, double *stats, float *f, const float *probs,
                    const float *lse, const int32_t *counts, int G, int E) {
    cuda_be *c = CB(be);
    double *P = grow(c, &c->f64, &c->f64_n, (size_t)(E > 0 ? E : 1), "route_stats");
    LAUNCH(c, E > 0 ? E : 0, sy_g_route_prob_sum, E, P, probs, G);
    LAUNCH1(c, sy_g_route_stats_sum, stats, f, P, lse, counts, G, E);
    done(c, "route_stats");
}

void cu_route_gamma(sy_backend_t *be, float *gamma, const float *dot, const int32_t *slot, int G) {
    cuda_be *c = CB(be);
    LAUNCH(c, G > 0 ? G : 0, sy_g_route_gamma, G, gamma, dot, slot);
    done(c, "route_gamma");
}

void cu_dropout_mask(sy_backend_t *be, float *mask, const int32_t *tok, const int32_t *micro,
                     int n, int F, float keep, float inv, uint64_t seed, int64_t step, int micro0,
                     int layer) {
    cuda_be *c = CB(be);
    const size_t m = (size_t)(n > 0 ? n : 0) * F;
    LAUNCH(c, m, sy_g_dropout_mask, m, mask, tok, micro, F, keep, inv, seed, c->tag_dropout, step,
           micro0, layer);
    done(c, "dropout_mask");
}

void cu_wire_put(sy_backend_t *be, void *dst, const float *src, size_t n, int es) {
    cuda_be *c = CB(be);
    if (es == 4) {
        if (n) CK("wire_put", cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyDeviceToDevice, c->stream));
    } else {
        LAUNCH(c, n, sy_g_wire_put, n, dst, src, es);
    }
    done(c, "wire_put");
}

void cu_wire_get(sy_backend_t *be, float *dst, const void *src, size_t n, int es) {
    cuda_be *c = CB(be);
    if (es == 4) {
        if (n) CK("wire_get", cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyDeviceToDevice, c->stream));
    } else {
        LAUNCH(c, n, sy_g_wire_get, n, dst, src, es);
    }
    done(c, "wire_get");
}

void release(cuda_be *c) {
    if (c->stream) (void)cudaStreamSynchronize(c->stream);
    void *bufs[] = {c->bfA, c->bfB, c->tmp, c->f64, c->inexact, c->blas_ws, c->ptrs};
    for (void *p : bufs)
        if (p) (void)cudaFree(p);
    if (c->blas) (void)cublasDestroy(c->blas);
    if (c->stream) (void)cudaStreamDestroy(c->stream);
    free(c);
}

void cu_destroy(sy_backend_t *be) {
    cuda_be *c = CB(be);
    set_dev(c, "destroy");
    int inexact = 0;
    if (c->inexact) {
        CK("destroy", cudaMemcpyAsync(&inexact, c->inexact, sizeof inexact, cudaMemcpyDeviceToHost,
                                      c->stream));
        CK("destroy", cudaStreamSynchronize(c->stream));
    }
    if (inexact)
        hlog(LOG_WARN, "cuda backend (device %d): some bf16 GEMM input was not a bf16 value and was "
                "rounded (RNE) on the way in; the CPU emulation multiplies such inputs in fp32 "
                "(expert dropout's scaled activations are one: docs/architecture.md \"cuda\")",
                c->device);
    release(c);
}

void install(sy_backend_t *b) {
    b->alloc = cu_alloc, b->free = cu_free;
    b->upload = cu_upload, b->download = cu_download, b->copy = cu_copy, b->zero = cu_zero;
    b->sync = cu_sync, b->host_view = cu_host_view;
    b->acc_add_f32 = cu_acc_add_f32, b->acc_to_f32 = cu_acc_to_f32, b->sumsq_add = cu_sumsq_add;
    b->scale = cu_scale, b->adamw = cu_adamw, b->round_bf16 = cu_round_bf16;
    b->embed_fwd = cu_embed_fwd, b->embed_bwd = cu_embed_bwd;
    b->matmul_fwd = cu_matmul_fwd, b->matmul_bwd = cu_matmul_bwd;
    b->matmul_bwd_acc64 = cu_matmul_bwd_acc64;
    b->matmul_fwd_group = cu_matmul_fwd_group, b->matmul_bwd_group = cu_matmul_bwd_group;
    b->layernorm_fwd = cu_layernorm_fwd, b->layernorm_bwd = cu_layernorm_bwd;
    b->attention_fwd = cu_attention_fwd, b->attention_bwd = cu_attention_bwd;
    b->gelu_fwd = cu_gelu_fwd, b->gelu_bwd = cu_gelu_bwd, b->add_inplace = cu_add_inplace;
    b->xent_fwd_bwd = cu_xent_fwd_bwd, b->xent_fwd = cu_xent_fwd;
    b->gather_rows = cu_gather_rows, b->scatter_rows_scaled = cu_scatter_rows_scaled;
    b->scatter_add_rows = cu_scatter_add_rows, b->gather_dot_scale = cu_gather_dot_scale;
    b->router_fwd = cu_router_fwd, b->router_bwd = cu_router_bwd;
    b->mul_inplace = cu_mul_inplace;
    b->jitter_fwd = cu_jitter_fwd, b->jitter_bwd = cu_jitter_bwd;
    b->route_plan = cu_route_plan, b->route_stats = cu_route_stats;
    b->route_gamma = cu_route_gamma, b->dropout_mask = cu_dropout_mask;
    b->wire_put = cu_wire_put, b->wire_get = cu_wire_get;
    b->destroy = cu_destroy;
}

int mod_devices(char *why, size_t why_len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && why_len)
            snprintf(why, why_len, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e),
                     e == cudaErrorNoDevice ? "no CUDA device visible: check nvidia-smi and CUDA_VISIBLE_DEVICES"
                     : e == cudaErrorInsufficientDriver
                         ? "no NVIDIA driver loaded, or one older than this CUDA runtime"
                         : "the CUDA runtime could not start");
        (void)cudaGetLastError();
        return e == cudaErrorNoDevice ? 0 : -1;
    }
    if (why && why_len) snprintf(why, why_len, "%d CUDA device(s) visible", n);
    return n;
}

// An error before the table exists: message into err, the status returned.
__attribute__((format(printf, 4, 5))) int fail(char *err, size_t err_len, int st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && err_len) vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
    return st;
}

#define NEW_CK(call, st)                                                                        \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) {                                                                \
            (void)cudaGetLastError();                                                           \
            release(c);                                                                         \
            return fail(err, err_len, (st), "cuda backend (device %d): %s: %s", device, #call,  \
                        cudaGetErrorString(e_));                                                \
        }                                                                                       \
    } while (0)

int mod_backend_new(const sy_cuda_host_api *host, int device, bool bf16, sy_backend_t **out,
                    char *err, size_t err_len) {
    *out = nullptr;
    if (!host || host->abi != SY_CUDA_MODULE_ABI)
        return fail(err, err_len, SY_EINTERNAL, "cuda backend module: ABI mismatch with the host (module %d)",
                    SY_CUDA_MODULE_ABI);
    g_host = host;
    char why[256];
    const int n = mod_devices(why, sizeof why);
    if (n <= 0)
        return fail(err, err_len, SY_ENOTFOUND, "cuda backend: device %d not available: %s", device, why);
    if (device < 0 || device >= n) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return fail(err, err_len, SY_ENOTFOUND,
                    "cuda backend: device %d not present: %d CUDA device(s) visible (0..%d; "
                    "CUDA_VISIBLE_DEVICES=%s)",
                    device, n, n - 1, vis ? vis : "unset");
    }
    cuda_be *c = static_cast<cuda_be *>(calloc(1, sizeof *c));
    if (!c) return fail(err, err_len, SY_ENOMEM, "cuda backend: out of memory");
    c->device = device;
    NEW_CK(cudaSetDevice(device), SY_ENOTFOUND);
    NEW_CK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), SY_ENOTFOUND);
    cublasStatus_t bs = cublasCreate(&c->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        c->blas = nullptr;
        release(c);
        return fail(err, err_len, SY_ENOTFOUND, "cuda backend (device %d): cublasCreate: %s", device,
                    blas_str(bs));
    }
    NEW_CK(cudaMalloc(&c->blas_ws, kCublasWorkspace), SY_ENOMEM);
    NEW_CK(cudaMalloc((void **)&c->inexact, sizeof(int)), SY_ENOMEM);
    NEW_CK(cudaMemsetAsync(c->inexact, 0, sizeof(int), c->stream), SY_ENOTFOUND);
    const cublasStatus_t s1 = cublasSetStream(c->blas, c->stream);
    const cublasStatus_t s2 = cublasSetWorkspace(c->blas, c->blas_ws, kCublasWorkspace);
    const cublasStatus_t s3 = cublasSetAtomicsMode(c->blas, CUBLAS_ATOMICS_NOT_ALLOWED);
    const cublasStatus_t s4 = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);
    const cublasStatus_t s5 = cublasSetPointerMode(c->blas, CUBLAS_POINTER_MODE_HOST);
    if (s1 || s2 || s3 || s4 || s5) {
        release(c);
        return fail(err, err_len, SY_ENOTFOUND, "cuda backend (device %d): configuring cuBLAS failed (%s)",
                    device, blas_str(s1 ? s1 : s2 ? s2 : s3 ? s3 : s4 ? s4 : s5));
    }
    NEW_CK(cudaStreamSynchronize(c->stream), SY_ENOTFOUND);
    const char *sync_env = getenv("SY_CUDA_SYNC");
    c->sync_each = sync_env && sync_env[0] == '1';
    const char *gemm_env = getenv("SY_CUDA_GEMM");
    c->fast16bf = gemm_env && strcmp(gemm_env, "fast16bf") == 0;
    const char *grouped_env = getenv("SY_CUDA_GROUPED");
    c->grouped = !(grouped_env && grouped_env[0] == '0');
    c->tag_jitter = host->tag_jitter;
    c->tag_dropout = host->tag_dropout;
    sy_backend_t *b = &c->base;
    b->name = "cuda";
    b->bf16 = bf16;
    install(b);
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
        hlog(LOG_INFO, "cuda backend: device %d (%s, sm_%d%d, %.1f GiB), %s%s%s", device, prop.name,
             prop.major, prop.minor, (double)prop.totalGlobalMem / (1u << 30),
             !bf16 ? "fp32 GEMMs" : c->fast16bf ? "bf16 GEMMs (SY_CUDA_GEMM=fast16bf)" : "bf16 GEMMs",
             c->sync_each ? ", SY_CUDA_SYNC=1" : "", c->grouped ? "" : ", SY_CUDA_GROUPED=0");
    *out = b;
    return SY_OK;
}

double mod_gemm_tflops(const sy_cuda_host_api *host, int device, int M, int N, int K, int iters,
                       char *err, size_t err_len) {
    sy_backend_t *be = nullptr;
    if (mod_backend_new(host, device, true, &be, err, err_len) != SY_OK) return -1.0;
    cuda_be *c = CB(be);
    const char *op = "gemm_tflops";
    uint16_t *A = nullptr, *B = nullptr;
    float *C = nullptr;
    CK(op, cudaMalloc((void **)&A, sizeof(uint16_t) * (size_t)M * K));
    CK(op, cudaMalloc((void **)&B, sizeof(uint16_t) * (size_t)K * N));
    CK(op, cudaMalloc((void **)&C, sizeof(float) * (size_t)M * N));
    CK(op, cudaMemsetAsync(A, 0x3f, sizeof(uint16_t) * (size_t)M * K, c->stream)); // ~0.75
    CK(op, cudaMemsetAsync(B, 0x3f, sizeof(uint16_t) * (size_t)K * N, c->stream));
    cudaEvent_t e0, e1;
    CK(op, cudaEventCreate(&e0));
    CK(op, cudaEventCreate(&e1));
    if (iters < 1) iters = 1;
    float *ms = static_cast<float *>(calloc((size_t)iters, sizeof(float)));
    for (int it = -3; it < iters; it++) {
        CK(op, cudaEventRecord(e0, c->stream));
        gemm1(c, op, false, false, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N, G_BF16);
        CK(op, cudaEventRecord(e1, c->stream));
        CK(op, cudaEventSynchronize(e1));
        if (it >= 0 && ms) CK(op, cudaEventElapsedTime(&ms[it], e0, e1));
    }
    double med = 0.0;
    if (ms) {
        for (int i = 1; i < iters; i++) // median by insertion sort (iters is small)
            for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
                float t = ms[j];
                ms[j] = ms[j - 1];
                ms[j - 1] = t;
            }
        med = ms[iters / 2];
        free(ms);
    }
    (void)cudaEventDestroy(e0);
    (void)cudaEventDestroy(e1);
    CK(op, cudaFree(A));
    CK(op, cudaFree(B));
    CK(op, cudaFree(C));
    be->destroy(be);
    if (!(med > 0)) {
        fail(err, err_len, SY_EINTERNAL, "cuda backend: gemm_tflops: no time measured");
        return -1.0;
    }
    return 2.0 * M * N * (double)K / (med * 1e-3) / 1e12;
}

const sy_cuda_module_api kModule = {SY_CUDA_MODULE_ABI, mod_devices, mod_backend_new, mod_gemm_tflops};

} // namespace

extern "C" __attribute__((visibility("default"))) const sy_cuda_module_api *sy_cuda_module(void) {
    return &kModule;
}
