/* Fuzzes sy_st_parse (a checkpoint file from the store or a disk) and, for an accepted file,
 * loads every tensor the way a restore does. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "base/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_tmpdir();
    sy_st_file_t *f = NULL;
    if (sy_st_parse(data, size, "fuzz.safetensors", &f) != SY_OK) return 0;
    for (int i = 0; i < sy_st_count(f); i++) {
        sy_tensor_ref t = {.name = sy_st_name(f, i)};
        t.ndim = sy_st_shape(f, i, t.shape);
        (void)sy_st_dtype_name(f, i);
        int64_t numel = sy_tensor_numel(&t);
        /* the data section holds every tensor, so numel is bounded by the input size */
        if (numel < 0 || (uint64_t)numel > size) abort();
        t.data = malloc((size_t)(numel ? numel : 1) * sizeof(float));
        if (t.data && sy_st_load(f, &t) != SY_OK) abort(); /* a validated file's tensors must load */
        free(t.data);
    }
    sy_st_destroy(&f);
    return 0;
}
