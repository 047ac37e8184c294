/* Helpers shared by the cmocka tests (tests/test_*.c); for test files only. Include after
 * <cmocka.h>.
 *
 * Random inputs: urand() (uniform in [0, 1), 53 bits), frand(lo, hi) and fill(x, n, lo, hi)
 * draw from one splitmix64 stream per test file, independent of src/base/rng so a test's inputs
 * do not move when the library's generator does. The stream starts at SY_TEST_SEED: define it
 * before including to fix a file's sequence (default 1).
 *
 * check_close(what, got, want, n, atol, rtol): asserts |got[i] - want[i]| <= atol + rtol·|want[i]|
 * for every i of an fp32 result against an fp64 reference, printing the first five misses.
 *
 * Temporary folders: setup_dir / teardown_dir as a cmocka setup and teardown (per test or per
 * group) make a fresh folder named SY_TESTDIR_PREFIX + "XXXXXX" (default "/tmp/sy-test-"),
 * whose path is in `tmpdir` meanwhile, and remove it with everything in it. sy_test_rmtree(path)
 * removes a folder tree without a shell.
 *
 * Backend buffers (when backend/backend.h is included first): a test treats what be->alloc()
 * returns as device memory, as a test of a GPU backend must (SY_BACKEND_POISON=1 makes any host
 * access crash): it prepares inputs in host arrays, uploads them, runs ops and downloads the
 * outputs to check them. sy_test_upload_new(be, host, bytes) allocates a buffer and uploads
 * `host` into it (host NULL: zeroed); sy_test_download(be, host, buf, bytes) downloads into a
 * host array; sy_test_download_new(be, buf, bytes) into a new malloc'ed one (the caller frees). */
#ifndef SY_TEST_H
#define SY_TEST_H

#include <ftw.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#ifndef SY_TEST_SEED
#define SY_TEST_SEED 1
#endif
#ifndef SY_TESTDIR_PREFIX
#define SY_TESTDIR_PREFIX "/tmp/sy-test-"
#endif

/* ---------------------------------------------------------------- random inputs */

static uint64_t g_sy_test_rs = SY_TEST_SEED;

/* Keyed values without a stream (each a pure function of its arguments): the splitmix64
 * finalizer, and a hash of three keys (the data-plane tests' chunk sizes and payloads). */
static inline uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static inline uint64_t h3(uint64_t a, uint64_t b, uint64_t c) { return mix(mix(mix(a) ^ b) ^ c); }

static inline double urand(void) { /* splitmix64 */
    uint64_t z = (g_sy_test_rs += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}
static inline float frand(double lo, double hi) { return (float)(lo + (hi - lo) * urand()); }
static inline void fill(float *x, size_t n, double lo, double hi) {
    for (size_t i = 0; i < n; i++) x[i] = frand(lo, hi);
}

/* ---------------------------------------------------------------- tolerance checks */

static inline void check_close(const char *what, const float *got, const double *want, size_t n,
                               double atol, double rtol) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        if (!(err <= atol + rtol * fabs(want[i]))) {
            if (bad < 5)
                fprintf(stderr, "%s[%zu]: got %.9g want %.9g (err %.3g)\n", what, i,
                        (double)got[i], want[i], err);
            bad++;
        }
    }
    if (bad) fprintf(stderr, "%s: %d of %zu entries off\n", what, bad, n);
    assert_int_equal(bad, 0);
}

/* ---------------------------------------------------------------- backend buffers */

#ifdef SY_BACKEND_H
static inline void *sy_test_upload_new(sy_backend_t *be, const void *host, size_t bytes) {
    void *buf = be->alloc(be, bytes ? bytes : 1);
    assert_non_null(buf);
    if (host && bytes) be->upload(be, buf, host, bytes);
    return buf;
}
/* an activation buffer (alloc_act: bf16 storage in bf16 mode) of bytes / 4 floats, uploaded
 * from `host` (host NULL: zeroed) */
static inline float *sy_test_upload_act(sy_backend_t *be, const void *host, size_t bytes) {
    float *buf = sy_alloc_act(be, bytes / sizeof(float));
    assert_non_null(buf);
    if (host && bytes) be->upload(be, buf, host, bytes);
    return buf;
}
static inline void sy_test_download(sy_backend_t *be, void *host, const void *buf, size_t bytes) {
    be->download(be, host, buf, bytes);
}
static inline void *sy_test_download_new(sy_backend_t *be, const void *buf, size_t bytes) {
    void *host = malloc(bytes ? bytes : 1);
    assert_non_null(host);
    be->download(be, host, buf, bytes);
    return host;
}
#endif

/* ---------------------------------------------------------------- temporary folders */

static char tmpdir[256];

static inline int sy_test_rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}
/* 0, or -1 when something could not be removed. */
static inline int sy_test_rmtree(const char *path) {
    return nftw(path, sy_test_rm_one, 16, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}
static inline int setup_dir(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "%sXXXXXX", SY_TESTDIR_PREFIX);
    return mkdtemp(tmpdir) ? 0 : -1;
}
static inline int teardown_dir(void **state) {
    (void)state;
    return sy_test_rmtree(tmpdir);
}

#endif
