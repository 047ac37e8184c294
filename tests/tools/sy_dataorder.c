/* sy_dataorder [--order feistel|fisher-yates] SEED T M b STEPS SHARD...: prints the sample order
 * (model spec §6; data.order, default feistel) as lines "s m j window_id first_token" for every
 * step s < STEPS, micro-batch m < M, row j < b.
 * sy_dataorder --feistel SEED EPOCH N I...: prints perm[I] of the feistel order, one a line
 * (any N up to 2^64 - 1, no shard needed).
 * Shards are opened with vocab 65536 (format checks only). Exit 1 with the error on stderr if
 * the shards do not open; 2 on bad usage. Driven by tests/py/test_data_order.py. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/data.h"

int main(int argc, char **argv) {
    sy_data_options o;
    sy_data_options_default(&o);
    o.prefetch_steps = 0;
    if (argc > 4 && !strcmp(argv[1], "--feistel")) {
        sy_feistel_t f;
        uint64_t N = strtoull(argv[4], NULL, 10);
        if (N == 0) {
            fprintf(stderr, "sy_dataorder: N must be >= 1\n");
            return 2;
        }
        sy_data_feistel_key(&f, N, strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10));
        for (int i = 5; i < argc; i++) printf("%" PRIu64 "\n", sy_data_feistel(&f, strtoull(argv[i], NULL, 10)));
        return 0;
    }
    if (argc > 2 && !strcmp(argv[1], "--order")) {
        if (!strcmp(argv[2], "feistel")) o.order = SY_ORDER_FEISTEL;
        else if (!strcmp(argv[2], "fisher-yates")) o.order = SY_ORDER_FISHER_YATES;
        else {
            fprintf(stderr, "sy_dataorder: --order %s: not feistel or fisher-yates\n", argv[2]);
            return 2;
        }
        argv += 2;
        argc -= 2;
    }
    if (argc < 7) {
        fprintf(stderr, "usage: %s [--order feistel|fisher-yates] SEED T M b STEPS SHARD...\n", argv[0]);
        return 2;
    }
    uint64_t seed = strtoull(argv[1], NULL, 10);
    int T = atoi(argv[2]), M = atoi(argv[3]), b = atoi(argv[4]);
    long long steps = atoll(argv[5]);
    if (T < 1 || M < 1 || b < 1 || steps < 0) {
        fprintf(stderr, "sy_dataorder: bad T/M/b/STEPS\n");
        return 2;
    }
    sy_data_t *d = NULL;
    if (sy_data_open_with((const char *const *)(argv + 6), argc - 6, 65536, T, &o, &d) != SY_OK) {
        fprintf(stderr, "sy_dataorder: %s\n", sy_err_msg());
        return 1;
    }
    int32_t *tok = malloc((size_t)b * (size_t)(T + 1) * sizeof *tok);
    int rc = tok ? 0 : 1;
    for (long long s = 0; rc == 0 && s < steps; s++) {
        for (int m = 0; rc == 0 && m < M; m++) {
            if (sy_data_train_batch(d, seed, s, M, b, m, tok) != SY_OK) {
                fprintf(stderr, "sy_dataorder: %s\n", sy_err_msg());
                rc = 1;
                break;
            }
            for (int j = 0; j < b; j++) {
                uint64_t w = sy_data_window_of(d, seed, sy_data_sample_index(s, M, b, m, j));
                printf("%lld %d %d %" PRIu64 " %" PRId32 "\n", s, m, j, w,
                       tok[(size_t)j * (size_t)(T + 1)]);
            }
        }
    }
    free(tok);
    sy_data_destroy(&d);
    return rc;
}
