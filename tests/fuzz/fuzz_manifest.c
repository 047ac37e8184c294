/* Fuzzes checkpoint manifests read from a store: the input is put as MANIFEST.json of step 2
 * of run "fz" in a local store (next to a real dense.safetensors), then read, validated, and
 * every file it lists is verified and loaded; sy_ckpt_latest then either takes step 2 or falls
 * back to the intact step 1, never fails or crashes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "storage/ckpt.h"
#include "fuzz_util.h"
#include "storage/store.h"

static sy_store_t *store;

static int setup(void) {
    if (store) return 0;
    const char *d = fz_tmpdir();
    char url[512];
    if (!d) return -1;
    snprintf(url, sizeof url, "file://%s/store", d);
    if (sy_store_open(url, &store) != SY_OK) return -1;
    /* a real checkpoint at step 1; its data file copied to step 2 for the fuzzed manifest */
    static float w[6] = {1, 2, 3, 4, 5, 6};
    sy_tensor_ref t = {.name = "w", .ndim = 2, .shape = {2, 3}, .data = w};
    sy_ckpt_group g = {.file = "dense.safetensors", .tensors = &t, .n = 1};
    if (sy_ckpt_save(store, "fz", 1, &g, 1, NULL) != SY_OK) return -1;
    void *buf = NULL;
    size_t len = 0;
    if (sy_store_get(store, "fz/ckpt/step-000000001/dense.safetensors", &buf, &len) != SY_OK) return -1;
    sy_status st = sy_store_put(store, "fz/ckpt/step-000000002/dense.safetensors", buf, len);
    free(buf);
    return st == SY_OK ? 0 : -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (setup() != 0) abort();
    if (sy_store_put(store, "fz/ckpt/step-000000002/MANIFEST.json", data, size) != SY_OK) abort();
    json_t *m = NULL;
    if (sy_ckpt_read_manifest(store, "fz", 2, &m) == SY_OK) {
        const json_t *fl = json_object_get(m, "files");
        for (size_t i = 0; i < json_array_size(fl); i++) {
            const char *name = json_string_value(json_object_get(json_array_get(fl, i), "name"));
            (void)sy_ckpt_verify_file(store, m, name);
            float w[6];
            sy_tensor_ref t = {.name = "w", .ndim = 2, .shape = {2, 3}, .data = w};
            sy_ckpt_group g = {.file = name, .tensors = &t, .n = 1};
            (void)sy_ckpt_load_group_m(store, m, &g);
        }
        json_decref(m);
    }
    int64_t step = -1;
    /* step 1 is intact: whatever step 2's manifest says, a usable checkpoint remains */
    if (sy_ckpt_latest(store, "fz", &step) != SY_OK || step < 1) abort();
    sy_ckpt_step_info *steps = NULL;
    size_t n = 0;
    if (sy_ckpt_list(store, "fz", &steps, &n) == SY_OK) free(steps);
    return 0;
}
