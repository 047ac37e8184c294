/* Bulk authenticated encryption on one core, for the data planes' cost (docs/performance.md
 * "Where the replication's cost goes"): how fast this CPU seals a buffer of a replica exchange's
 * size (default 8.39 MB, the tiny model's expert state per worker per step) with
 *   - crypto_box_easy_afternm (XSalsa20-Poly1305): what CurveZMQ seals every message with,
 *     without libzmq's own copies around it;
 *   - crypto_aead_chacha20poly1305_ietf_encrypt;
 *   - crypto_aead_aes256gcm_encrypt (only where the CPU has AES-NI and PCLMULQDQ);
 * and a memcpy of the same size as the floor. Each: median of --iters runs after 2 warm-ups,
 * printed as ms and GB/s, and a "RESULT" line per cipher. libsodium (libsodium-dev, which
 * libzmq's CURVE uses) is loaded at run time (dlopen of libsodium.so.23): nothing links it.
 *   cipher_bench [--mb X (8.39)] [--iters N (15)] */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*init_fn)(void);
typedef int (*box_fn)(unsigned char *, const unsigned char *, unsigned long long, const unsigned char *,
                      const unsigned char *);
typedef int (*aead_fn)(unsigned char *, unsigned long long *, const unsigned char *, unsigned long long,
                       const unsigned char *, unsigned long long, const unsigned char *, const unsigned char *,
                       const unsigned char *);
typedef int (*avail_fn)(void);

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    double mb = 8.388608;
    int iters = 15;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mb") && i + 1 < argc) mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: cipher_bench [--mb X (8.39)] [--iters N (15)]\n");
            return strcmp(argv[i], "--help") && strcmp(argv[i], "-h") ? 2 : 0;
        }
    }
    if (mb <= 0 || mb > 4096 || iters < 1 || iters > 1000) {
        fprintf(stderr, "cipher_bench: --mb in (0, 4096], --iters in [1, 1000]\n");
        return 2;
    }
    void *so = dlopen("libsodium.so.23", RTLD_NOW);
    if (!so) {
        fprintf(stderr, "cipher_bench: cannot load libsodium.so.23 (apt-get install libsodium23): %s\n", dlerror());
        return 1;
    }
    init_fn init = (init_fn)dlsym(so, "sodium_init");
    box_fn box = (box_fn)dlsym(so, "crypto_box_easy_afternm");
    aead_fn chacha = (aead_fn)dlsym(so, "crypto_aead_chacha20poly1305_ietf_encrypt");
    aead_fn gcm = (aead_fn)dlsym(so, "crypto_aead_aes256gcm_encrypt");
    avail_fn gcm_ok = (avail_fn)dlsym(so, "crypto_aead_aes256gcm_is_available");
    if (!init || !box || !chacha || !gcm || !gcm_ok || init() < 0) {
        fprintf(stderr, "cipher_bench: libsodium lacks a function this benchmark needs\n");
        return 1;
    }
    const size_t n = (size_t)(mb * 1e6);
    unsigned char *src = malloc(n), *dst = malloc(n + 64);
    if (!src || !dst) {
        fprintf(stderr, "cipher_bench: out of memory for %zu bytes\n", n);
        return 1;
    }
    for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i * 2654435761u >> 13);
    unsigned char key[32] = {1, 2, 3}, nonce[24] = {4, 5, 6};
    const char *names[] = {"memcpy", "xsalsa20poly1305", "chacha20poly1305", "aes256gcm"};
    double *t = malloc(sizeof(double) * (size_t)iters);
    printf("%.2f MB per run, %d runs (median), one core\n", n / 1e6, iters);
    for (int c = 0; c < 4; c++) {
        if (c == 3 && !gcm_ok()) {
            printf("%-18s not available on this CPU (no AES-NI/PCLMULQDQ)\n", names[c]);
            continue;
        }
        for (int k = -2; k < iters; k++) {
            double t0 = now_ms();
            unsigned long long cl = 0;
            int rc = 0;
            if (c == 0) memcpy(dst, src, n);
            else if (c == 1) rc = box(dst, src, n, nonce, key);
            else if (c == 2) rc = chacha(dst, &cl, src, n, NULL, 0, NULL, nonce, key);
            else rc = gcm(dst, &cl, src, n, NULL, 0, NULL, nonce, key);
            if (rc != 0) {
                fprintf(stderr, "cipher_bench: %s failed\n", names[c]);
                return 1;
            }
            if (k >= 0) t[k] = now_ms() - t0;
        }
        qsort(t, (size_t)iters, sizeof *t, cmp);
        double med = t[iters / 2];
        printf("%-18s %8.2f ms  %6.2f GB/s\n", names[c], med, n / med / 1e6);
        printf("RESULT name=%s mb=%.3f ms=%.3f gbps=%.3f\n", names[c], n / 1e6, med, n / med / 1e6);
    }
    free(t);
    free(src);
    free(dst);
    return 0;
}
