/* Vectorisable elementwise math for the CPU backend.
 *
 * sy_expf: Cephes-style expf (range reduction by ln 2 in two parts, degree-6 polynomial,
 * scaling by 2^n through the exponent bits): within 2 ulp of expf over [-87, 88], branch-free so
 * that `omp simd` loops vectorise it (libm's expf/tanhf calls do not). Inputs below -87 give 0
 * (well, a subnormal-free 2^-126·p), above 88 saturate.
 * Both are the kernel bodies' sy_k_expf / sy_k_tanhf (kernels/k_math.h), declared simd here so
 * that the CPU backend's `omp simd` loops vectorise them. */
#ifndef SY_CPU_MATH_H
#define SY_CPU_MATH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "backend/kernels/k_math.h"

/* Hot kernels are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time. */
#define SY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

#pragma omp declare simd notinbranch
static inline float sy_expf(float x) { return sy_k_expf(x); }

#pragma omp declare simd notinbranch
static inline float sy_tanhf(float u) { return sy_k_tanhf(u); }

/* bf16 conversions over a range, written branch-free so that `omp simd` vectorises them: the
 * same bits as the kernel bodies' sy_k_f32_to_bf16 / sy_k_bf16_to_f32 / sy_k_round_bf16
 * (round to nearest, ties to even; a NaN keeps its sign and top payload and is made quiet). The
 * bf16 storage wrap runs one for every bf16 operand of every op. */
static inline uint32_t sy_cpu_bf16_bits(uint32_t u) {
    const uint32_t rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x0040u;
    return (u & 0x7fffffffu) > 0x7f800000u ? nan : rne;
}

SY_CLONES __attribute__((unused)) static void sy_cpu_narrow_range(uint16_t *d, const float *s, size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        uint32_t u;
        memcpy(&u, s + i, sizeof u);
        d[i] = (uint16_t)sy_cpu_bf16_bits(u);
    }
}

SY_CLONES __attribute__((unused)) static void sy_cpu_widen_range(float *d, const uint16_t *s, size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        const uint32_t u = (uint32_t)s[i] << 16;
        memcpy(d + i, &u, sizeof u);
    }
}

SY_CLONES __attribute__((unused)) static void sy_cpu_round_range(float *x, size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        u = sy_cpu_bf16_bits(u) << 16;
        memcpy(x + i, &u, sizeof u);
    }
}

/* Runs the statements (using lo, hi) for the chunks [lo, hi) of [0, n), SY_CPU_CONV_CHUNK
 * elements each, spread over OpenMP threads (a single chunk stays on the caller). */
#define SY_CPU_CONV_CHUNK ((size_t)1 << 15)
#define SY_CPU_CHUNKED(n, lo, hi, ...)                                                        \
    do {                                                                                      \
        const size_t sy_n_ = (n), sy_nc_ = (sy_n_ + SY_CPU_CONV_CHUNK - 1) / SY_CPU_CONV_CHUNK; \
        _Pragma("omp parallel for schedule(static) if (sy_nc_ > 1)")                          \
        for (size_t sy_c_ = 0; sy_c_ < sy_nc_; sy_c_++) {                                     \
            const size_t lo = sy_c_ * SY_CPU_CONV_CHUNK;                                      \
            const size_t hi = lo + SY_CPU_CONV_CHUNK < sy_n_ ? lo + SY_CPU_CONV_CHUNK : sy_n_; \
            __VA_ARGS__;                                                                      \
        }                                                                                     \
    } while (0)

#endif
