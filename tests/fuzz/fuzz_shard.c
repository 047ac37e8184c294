/* Fuzzes token-shard validation (sy_data_open on a local file): the first 4 input bytes pick
 * vocab_size and seq_len, the rest is the shard. An accepted shard is read through every window
 * (eval batches) and one training batch. */
#include <stdint.h>
#include <stdlib.h>

#include "data/data.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4) return 0;
    int vocab = 1 + (int)((data[0] | (unsigned)data[1] << 8) % 65536);
    int T = 1 + (int)((data[2] | (unsigned)data[3] << 8) % 64);
    char path[512];
    if (fz_write("shard.bin", data + 4, size - 4, path, sizeof path) != 0) abort();
    const char *pat[] = {path};
    sy_data_t *d = NULL;
    if (sy_data_open(pat, 1, vocab, T, &d) != SY_OK) return 0;
    uint64_t N = sy_data_windows(d);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(T + 1) * 4);
    if (!tok) abort();
    for (uint64_t w = 0; w < N && w < 4096; w += 4) {
        if (sy_data_eval_batch(d, w, 4, tok) != SY_OK) abort();
        for (int i = 0; i < 4 * (T + 1); i++)
            if (tok[i] < 0 || tok[i] >= vocab) abort(); /* every token was checked against vocab */
    }
    if (sy_data_train_batch(d, 7, 3, 2, 2, 1, tok) != SY_OK) abort();
    free(tok);
    sy_data_destroy(&d);
    return 0;
}
