#include "base/rng.h"

#include <math.h>

#define SY_GOLDEN64 0x9E3779B97F4A7C15ull

uint64_t sy_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t sy_fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

sy_rng_t sy_rng_key(uint64_t seed, const char *tag, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t z = sy_mix64(seed ^ sy_fnv1a64(tag));
    z = sy_mix64(z ^ a);
    z = sy_mix64(z ^ b);
    z = sy_mix64(z ^ c);
    return (sy_rng_t){z};
}

uint64_t sy_rng_next(sy_rng_t *r) {
    r->state += SY_GOLDEN64;
    return sy_mix64(r->state);
}

float sy_rng_uniform(sy_rng_t *r) { return (float)(sy_rng_next(r) >> 40) * (1.0f / 16777216.0f); }

uint64_t sy_rng_below(sy_rng_t *r, uint64_t n) {
    uint64_t limit = (UINT64_MAX / n) * n; /* floor(2^64-1 / n)·n; values >= limit rejected */
    uint64_t x;
    do {
        x = sy_rng_next(r);
    } while (x >= limit);
    return x % n;
}

double sy_rng_normal(sy_rng_t *r) {
    double u1 = ((double)(sy_rng_next(r) >> 11) + 1.0) * 0x1.0p-53;
    double u2 = (double)(sy_rng_next(r) >> 11) * 0x1.0p-53;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}
