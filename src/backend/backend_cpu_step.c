/* CPU backend, part two: host <-> backend traffic (backend buffers are host memory here, so
 * these are copies) and the per-element ops of the parameter path (fp64 gradient accumulation,
 * sums of squares for the global norm, clipping, AdamW; the bf16 re-rounding of working weights
 * is round_bf16 in backend_cpu.c).
 * Each op does the same floating-point operations in the same order as the host loops it
 * replaced (model.c, optim.c), so results are bit-identical whatever the thread count. The
 * per-element work is the shared kernel bodies' (kernels/), the code the emulation and CUDA
 * backends run. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/kernels/k_elementwise.h"
#include "backend/kernels/k_route.h"
#include "backend_cpu_internal.h"

#define COPY_CHUNK ((size_t)4 << 20) /* bytes per parallel memcpy piece */
#define SUMSQ_CHUNK SY_K_SUMSQ_CHUNK /* elements per partial sum: fixes the summation order */

/* ---- host <-> backend traffic ---- */

/* memcpy in COPY_CHUNK pieces, in parallel when there is more than one */
static void par_memcpy(void *dst, const void *src, size_t bytes) {
    long nchunks = (long)((bytes + COPY_CHUNK - 1) / COPY_CHUNK);
    if (nchunks <= 1) {
        if (bytes) memcpy(dst, src, bytes);
        return;
    }
#pragma omp parallel for schedule(static)
    for (long c = 0; c < nchunks; c++) {
        size_t off = (size_t)c * COPY_CHUNK, len = bytes - off < COPY_CHUNK ? bytes - off : COPY_CHUNK;
        memcpy((char *)dst + off, (const char *)src + off, len);
    }
}

static void cpu_upload(sy_backend_t *be, void *dst, const void *src_host, size_t bytes) {
    (void)be;
    par_memcpy(dst, src_host, bytes);
}

static void cpu_download(sy_backend_t *be, void *dst_host, const void *src, size_t bytes) {
    (void)be;
    par_memcpy(dst_host, src, bytes);
}

static void cpu_copy(sy_backend_t *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    par_memcpy(dst, src, bytes);
}

static void cpu_zero(sy_backend_t *be, void *p, size_t bytes) {
    (void)be;
    if (bytes) memset(p, 0, bytes);
}

static void cpu_sync(sy_backend_t *be) { (void)be; }

/* backend buffers are host memory */
static void *cpu_host_view(sy_backend_t *be, void *p) {
    (void)be;
    return p;
}

/* ---- the parameter / gradient / optimizer path ---- */

/* The element loops below run in SIMD ranges compiled for AVX-512 and AVX2 as well as the
 * baseline, picked at load time: each element gets the bits of the scalar body (conversions,
 * +, ·, sqrt and / are correctly rounded in every vector width, and nothing is reordered). */
#define SY_STEP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SY_STEP_CHUNK 16384
#define SY_STEP_CHUNKS(n) (((n) + SY_STEP_CHUNK - 1) / SY_STEP_CHUNK)
#define SY_STEP_END(c, n) ((c) + 1) * SY_STEP_CHUNK < (n) ? ((c) + 1) * SY_STEP_CHUNK : (n)

SY_STEP_CLONES static void acc_add_range(double *restrict acc, const float *restrict g, size_t lo,
                                         size_t hi) {
#pragma omp simd
    for (size_t k = lo; k < hi; k++) sy_k_acc_add_f32(k, acc, g);
}

SY_STEP_CLONES static void acc_to_f32_range(float *restrict g, const double *restrict acc,
                                            size_t lo, size_t hi) {
#pragma omp simd
    for (size_t k = lo; k < hi; k++) sy_k_acc_to_f32(k, g, acc);
}

SY_STEP_CLONES static void scale_range(float *g, float c, size_t lo, size_t hi) {
#pragma omp simd
    for (size_t k = lo; k < hi; k++) sy_k_scale(k, g, c);
}

static void cpu_acc_add_f32(sy_backend_t *be, double *acc, const float *g, size_t n) {
    (void)be;
    const size_t nc = SY_STEP_CHUNKS(n);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (size_t c = 0; c < nc; c++) acc_add_range(acc, g, c * SY_STEP_CHUNK, SY_STEP_END(c, n));
}

static void cpu_acc_to_f32(sy_backend_t *be, float *g, const double *acc, size_t n) {
    (void)be;
    const size_t nc = SY_STEP_CHUNKS(n);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (size_t c = 0; c < nc; c++) acc_to_f32_range(g, acc, c * SY_STEP_CHUNK, SY_STEP_END(c, n));
}

static void cpu_sumsq_add(sy_backend_t *be, double *out, const float *g, size_t n) {
    (void)be;
    size_t nchunks = (n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
    double total = 0.0;
    double *part = malloc(sizeof(double) * (nchunks ? nchunks : 1));
    if (!part) {
        for (size_t i = 0; i < n; i++) total += (double)g[i] * g[i];
        out[0] += total;
        return;
    }
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunks; c++) sy_k_sumsq_chunk(c, part, g, n);
    for (size_t c = 0; c < nchunks; c++) total += part[c];
    free(part);
    out[0] += total;
}

static void cpu_scale(sy_backend_t *be, float *g, size_t n, float c) {
    (void)be;
    const size_t nc = SY_STEP_CHUNKS(n);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (size_t k = 0; k < nc; k++) scale_range(g, c, k * SY_STEP_CHUNK, SY_STEP_END(k, n));
}

SY_STEP_CLONES static void adamw_range(float *restrict p, const float *restrict g,
                                       float *restrict m, float *restrict v, size_t lo, size_t hi,
                                       float decay, float b1, float b2, float step_size,
                                       float inv_sqrt_bc2, float eps) {
#pragma omp simd
    for (size_t k = lo; k < hi; k++)
        sy_k_adamw(k, p, g, m, v, decay, b1, b2, step_size, inv_sqrt_bc2, eps);
}

static void cpu_adamw(sy_backend_t *be, float *pp, const float *gg, float *mm, float *vv, size_t n,
                      float decay, float b1, float b2, float step_size, float inv_sqrt_bc2,
                      float eps) {
    (void)be;
    const size_t nc = SY_STEP_CHUNKS(n);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (size_t c = 0; c < nc; c++)
        adamw_range(pp, gg, mm, vv, c * SY_STEP_CHUNK, SY_STEP_END(c, n), decay, b1, b2, step_size,
                    inv_sqrt_bc2, eps);
}

void sy_cpu_step_install(sy_backend_t *b) {
    b->upload = cpu_upload;
    b->download = cpu_download;
    b->copy = cpu_copy;
    b->zero = cpu_zero;
    b->sync = cpu_sync;
    b->host_view = cpu_host_view;
    b->acc_add_f32 = cpu_acc_add_f32;
    b->acc_to_f32 = cpu_acc_to_f32;
    b->sumsq_add = cpu_sumsq_add;
    b->scale = cpu_scale;
    b->adamw = cpu_adamw;
}
