/* Helper for tests/py/test_safetensors_torch.py.
 *   sy_stwrite <path> f32|bf16   writes a file with a few known tensors (values defined below;
 *                                the Python test recomputes them independently)
 *   sy_stwrite --read <path>     reads a file with sy_st_read_file and prints one JSON line per
 *                                tensor: {"name", "dtype", "shape", "bits": [fp32 bit patterns]}
 * Exit status: 0 ok, 1 failure (message on stderr), 2 usage. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/safetensors.h"

static int do_write(const char *path, const char *kind) {
    sy_st_dtype dt;
    if (!strcmp(kind, "f32")) dt = SY_ST_F32;
    else if (!strcmp(kind, "bf16")) dt = SY_ST_BF16;
    else return 2;
    float a[6], b[5] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 0.1f, -3.140625f, 1e-3f}, c[1] = {42.0f}, d[16], e[1];
    for (int i = 0; i < 6; i++) a[i] = (float)i * 0.5f - 1.25f;
    for (int i = 0; i < 16; i++) d[i] = (float)(((i * 7) % 11) / 8.0 - 0.6);
    sy_tensor_ref t[] = {
        {"a.weight", 2, {2, 3}, a},
        {"b.bias", 1, {5}, b},
        {"c.scalar", 0, {0}, c},
        {"d.three_d", 3, {2, 2, 4}, d},
        {"e.empty", 2, {0, 3}, e},
    };
    sy_status st = sy_st_write_file(path, t, (int)(sizeof t / sizeof t[0]), dt);
    if (st != SY_OK) {
        fprintf(stderr, "sy_stwrite: %s\n", sy_err_msg());
        return 1;
    }
    return 0;
}

static int do_read(const char *path) {
    sy_st_file_t *f = NULL;
    if (sy_st_read_file(path, &f) != SY_OK) {
        fprintf(stderr, "sy_stwrite: %s\n", sy_err_msg());
        return 1;
    }
    int rc = 0;
    for (int i = 0; i < sy_st_count(f) && !rc; i++) {
        sy_tensor_ref t = {sy_st_name(f, i), 0, {0}, NULL};
        t.ndim = sy_st_shape(f, i, t.shape);
        int64_t n = sy_tensor_numel(&t);
        t.data = malloc(sizeof(float) * (size_t)(n ? n : 1));
        if (!t.data || sy_st_load(f, &t) != SY_OK) {
            fprintf(stderr, "sy_stwrite: %s\n", t.data ? sy_err_msg() : "out of memory");
            rc = 1;
        } else {
            printf("{\"name\": \"%s\", \"dtype\": \"%s\", \"shape\": [", t.name, sy_st_dtype_name(f, i));
            for (int d = 0; d < t.ndim; d++) printf("%s%" PRId64, d ? ", " : "", t.shape[d]);
            printf("], \"bits\": [");
            for (int64_t k = 0; k < n; k++) {
                uint32_t u;
                memcpy(&u, &t.data[k], 4);
                printf("%s%" PRIu32, k ? ", " : "", u);
            }
            printf("]}\n");
        }
        free(t.data);
    }
    sy_st_destroy(&f);
    return rc;
}

int main(int argc, char **argv) {
    int rc = 2;
    if (argc == 3 && !strcmp(argv[1], "--read")) rc = do_read(argv[2]);
    else if (argc == 3) rc = do_write(argv[1], argv[2]);
    if (rc == 2) fprintf(stderr, "usage: sy_stwrite <path> f32|bf16 | sy_stwrite --read <path>\n");
    return rc;
}
