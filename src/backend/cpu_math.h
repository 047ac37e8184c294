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

#include "backend/kernels/k_math.h"

#pragma omp declare simd notinbranch
static inline float sy_expf(float x) { return sy_k_expf(x); }

#pragma omp declare simd notinbranch
static inline float sy_tanhf(float u) { return sy_k_tanhf(u); }

#endif
