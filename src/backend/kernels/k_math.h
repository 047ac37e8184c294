/* Scalar helpers of the kernel bodies (SY_HD, host and device): bit casts, bf16 rounding,
 * the vectorisable expf/tanhf of the CPU backend, and the counter-based random draws.
 *
 * Each is the same arithmetic as its host twin, so a body gives the host's bits:
 *   sy_k_f32_to_bf16 / sy_k_bf16_to_f32 / sy_k_round_bf16  = base/bf16.h (RNE, NaN kept quiet)
 *   sy_k_expf / sy_k_tanhf                                 = cpu_math.h's sy_expf / sy_tanhf
 *                                                            (cpu_math.h calls these)
 *   sy_k_rng_key / sy_k_rng_uniform_at                     = base/rng.h's sy_rng_key and the
 *     i-th sy_rng_uniform after it. SplitMix64's state after k draws is key + k·golden, so
 *     draw i of a row is a pure function of (key, i): a grid thread per element draws its own
 *     without walking the row. The tag's FNV-1a hash is computed on the host (sy_fnv1a64).
 * tests/test_backend_emu.c checks each against its twin. */
#ifndef SY_K_MATH_H
#define SY_K_MATH_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "backend/sy_hd.h"

SY_HD uint32_t sy_k_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

SY_HD float sy_k_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

SY_HD uint16_t sy_k_f32_to_bf16(float f) {
    uint32_t u = sy_k_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

SY_HD float sy_k_bf16_to_f32(uint16_t h) { return sy_k_bits_f32((uint32_t)h << 16); }

SY_HD float sy_k_round_bf16(float f) { return sy_k_bf16_to_f32(sy_k_f32_to_bf16(f)); }

/* f rounded to bf16 when bf16, else f */
SY_HD float sy_k_act(float f, bool bf16) { return bf16 ? sy_k_round_bf16(f) : f; }

/* Cephes-style expf, within 2 ulp over [-87, 88] (cpu_math.h has the details) */
SY_HD float sy_k_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
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
    return p * sy_k_bits_f32((uint32_t)(((int32_t)n + 127) << 23));
}

SY_HD float sy_k_tanhf(float u) {
    float a = u < 0.0f ? -u : u;
    float t = 1.0f - 2.0f / (sy_k_expf(2.0f * a) + 1.0f);
    return u < 0.0f ? -t : t;
}

#define SY_K_GOLDEN64 0x9E3779B97F4A7C15ull

SY_HD uint64_t sy_k_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* sy_rng_key(seed, tag, a, b, c).state, with tag_hash = sy_fnv1a64(tag) */
SY_HD uint64_t sy_k_rng_key(uint64_t seed, uint64_t tag_hash, uint64_t a, uint64_t b,
                            uint64_t c) {
    uint64_t z = sy_k_mix64(seed ^ tag_hash);
    z = sy_k_mix64(z ^ a);
    z = sy_k_mix64(z ^ b);
    return sy_k_mix64(z ^ c);
}

/* the (i+1)-th sy_rng_uniform of a generator keyed `key`: [0, 1), 24 bits */
SY_HD float sy_k_rng_uniform_at(uint64_t key, uint64_t i) {
    return (float)(sy_k_mix64(key + (i + 1) * SY_K_GOLDEN64) >> 40) * (1.0f / 16777216.0f);
}

#endif
