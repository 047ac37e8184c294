/* Portable, counter-based randomness: every draw is a pure function of its key, so init, data
 * order, jitter and dropout are the same whatever the number of workers and whichever worker
 * runs a micro-batch (model spec §3, §6).
 *
 * The generator is SplitMix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, output =
 * mix(state). Streams are keyed by hashing: sy_rng_key(seed, tag, a, b, c) mixes a 64-bit seed,
 * a string tag (FNV-1a 64) and up to three integers. Everything here is specified bit-exactly so
 * that tests/py re-implements it in a few lines of Python. */
#ifndef SY_RNG_H
#define SY_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t state;
} sy_rng_t;

/* SplitMix64 finaliser: z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) *
 * 0x94D049BB133111EB; z ^ (z >> 31). */
uint64_t sy_mix64(uint64_t z);
/* FNV-1a 64 of a NUL-terminated string. */
uint64_t sy_fnv1a64(const char *s);
/* state = mix(mix(mix(mix(seed ^ fnv(tag)) ^ a) ^ b) ^ c) -- each ^ then sy_mix64. */
sy_rng_t sy_rng_key(uint64_t seed, const char *tag, uint64_t a, uint64_t b, uint64_t c);

/* Next 64 random bits: state += 0x9E3779B97F4A7C15; return sy_mix64(state). */
uint64_t sy_rng_next(sy_rng_t *r);
/* Uniform in [0, 1): (next >> 40) * 2^-24, as float exactly representable. */
float sy_rng_uniform(sy_rng_t *r);
/* Uniform integer in [0, n) by rejection (unbiased): draws next until x < floor((2^64-1)/n)·n,
 * returns x % n. */
uint64_t sy_rng_below(sy_rng_t *r, uint64_t n);
/* Standard normal by Box–Muller in double: u1 = (next>>11 + 1)·2^-53, u2 = (next>>11)·2^-53,
 * returns sqrt(-2 ln u1)·cos(2π u2). */
double sy_rng_normal(sy_rng_t *r);

#endif
