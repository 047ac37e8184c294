/* Fuzzes token-shard validation on a local file: the first 4 input bytes pick vocab_size and
 * seq_len, the rest is the shard. sy_data_validate (every token) and sy_data_open (header and
 * size; tokens as windows are read) must agree: a shard that validates opens and reads through
 * every window (eval batches) and one training batch with every token < vocab; one that does not
 * may open, but a batch then either holds only tokens < vocab or fails with SY_EFORMAT. */
#include <stdint.h>
#include <stdlib.h>

#include "data/data.h"
#include "fuzz_util.h"

static int batch_ok(sy_status st, int valid, const int32_t *tok, int n, int vocab) {
    if (st != SY_OK) {
        if (valid || st != SY_EFORMAT) abort(); /* a valid shard reads; a bad one fails cleanly */
        return 0;
    }
    for (int i = 0; i < n; i++)
        if (tok[i] < 0 || tok[i] >= vocab) abort(); /* every token handed out was checked */
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4) return 0;
    int vocab = 1 + (int)((data[0] | (unsigned)data[1] << 8) % 65536);
    int T = 1 + (int)((data[2] | (unsigned)data[3] << 8) % 64);
    char path[512];
    if (fz_write("shard.bin", data + 4, size - 4, path, sizeof path) != 0) abort();
    const char *pat[] = {path};
    sy_data_check_counts cc;
    int valid = sy_data_validate(pat, 1, vocab, T, NULL, NULL, &cc) == SY_OK && cc.windows > 0;
    sy_data_t *d = NULL;
    if (sy_data_open(pat, 1, vocab, T, &d) != SY_OK) {
        if (valid) abort();
        return 0;
    }
    uint64_t N = sy_data_windows(d);
    if (valid && N != cc.windows) abort();
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(T + 1) * 4);
    if (!tok) abort();
    for (uint64_t w = 0; w < N && w < 4096; w += 4)
        batch_ok(sy_data_eval_batch(d, w, 4, tok), valid, tok, 4 * (T + 1), vocab);
    batch_ok(sy_data_train_batch(d, 7, 3, 2, 2, 1, tok), valid, tok, 2 * (T + 1), vocab);
    free(tok);
    sy_data_destroy(&d);
    return 0;
}
