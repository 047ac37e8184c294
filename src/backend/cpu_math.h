/* Vectorisable elementwise math for the CPU backend.
 *
 * sy_expf: Cephes-style expf (range reduction by ln 2 in two parts, degree-6 polynomial,
 * scaling by 2^n through the exponent bits): within 2 ulp of expf over [-87, 88], branch-free so
 * that `omp simd` loops vectorise it (libm's expf/tanhf calls do not). Inputs below -87 give 0
 * (well, a subnormal-free 2^-126·p), above 88 saturate. */
#ifndef SY_CPU_MATH_H
#define SY_CPU_MATH_H

#include <stdint.h>
#include <string.h>

#pragma omp declare simd notinbranch
static inline float sy_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* round to nearest by the 1.5·2^23 trick (|x·log2e| < 2^22): no libm call, vectorises */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

/* tanh(u) = 1 − 2/(e^{2u} + 1), odd-symmetric; accurate to a few ulp away from 0, and within
 * 1e-7 absolute near 0. */
#pragma omp declare simd notinbranch
static inline float sy_tanhf(float u) {
    float a = u < 0.0f ? -u : u;
    float t = 1.0f - 2.0f / (sy_expf(2.0f * a) + 1.0f);
    return u < 0.0f ? -t : t;
}

#endif
