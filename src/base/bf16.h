/* bfloat16 conversions: the top 16 bits of an IEEE binary32.
 *
 * float → bf16 rounds to nearest, ties to even; Inf stays Inf, values that round past the largest
 * finite bf16 become Inf (as IEEE rounding does), and NaN stays a NaN (quieted, sign kept) instead
 * of being rounded into Inf. bf16 → float is exact. Pure functions; any thread. */
#ifndef SY_BF16_H
#define SY_BF16_H

#include <stdint.h>
#include <string.h>

static inline uint16_t sy_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign and top payload, force quiet bit */
        return (uint16_t)((u >> 16) | 0x0040u);
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb; /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline float sy_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The float value of f rounded to bf16 precision. */
static inline float sy_round_bf16(float f) { return sy_bf16_to_f32(sy_f32_to_bf16(f)); }

#endif
