/* Fuzzes the CurveZMQ key files: the input is written (mode 0600) as a key file and as an
 * authorized-keys file and loaded as each. */
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "proto/curve.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[512];
    if (fz_write("fz.key", data, size, path, sizeof path) != 0 || chmod(path, 0600) != 0) abort();
    sy_curve_key k;
    if (sy_curve_load_key(path, true, &k) == SY_OK) {
        if (!k.has_secret || !sy_curve_z85_ok(k.public_z85, NULL)) abort();
        sy_curve_key_wipe(&k);
    }
    if (sy_curve_load_key(path, false, &k) == SY_OK && !sy_curve_z85_ok(k.public_z85, NULL)) abort();
    sy_curve_keyset_t *set = NULL;
    if (sy_curve_keyset_load(path, &set) == SY_OK) {
        if (sy_curve_keyset_size(set) < 1) abort();
        uint8_t raw[32] = {0};
        (void)sy_curve_keyset_has(set, raw);
    }
    sy_curve_keyset_destroy(&set);
    return 0;
}
