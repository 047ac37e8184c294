/* Fuzzes the run configuration from its three outside sources: the first input byte picks
 * YAML file (sy_config_load), --set lines (sy_config_set, one per line) or JSON (the Assign's
 * config_json: sy_config_from_json). Whatever loads is validated, turned to JSON and read back
 * into a fresh config, which must equal it. */
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/config.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] % 3;
    data++, size--;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    if (sy_config_defaults(&cfg) != SY_OK) abort();
    sy_status st = SY_OK;
    if (mode == 0) {
        char path[512];
        if (fz_write("fz.yaml", data, size, path, sizeof path) != 0) abort();
        st = sy_config_load(&cfg, path);
    } else if (mode == 1) {
        char *s = fz_str(data, size), *save = NULL;
        if (!s) abort();
        for (char *line = strtok_r(s, "\n", &save); line && st == SY_OK; line = strtok_r(NULL, "\n", &save))
            st = sy_config_set(&cfg, line);
        free(s);
    } else {
        json_error_t jerr;
        json_t *j = json_loadb((const char *)data, size, 0, &jerr);
        if (j) st = sy_config_from_json(&cfg, j);
        json_decref(j);
    }
    (void)st;
    bool valid = sy_config_validate(&cfg) == SY_OK;
    json_t *j = sy_config_to_json(&cfg);
    if (j && valid) { /* what the coordinator sends in Assign must read back the same */
        sy_config_t back;
        memset(&back, 0, sizeof back);
        if (sy_config_defaults(&back) != SY_OK) abort();
        if (sy_config_from_json(&back, j) != SY_OK) abort();
        free(back.status.token); /* a secret: never in the JSON */
        back.status.token = cfg.status.token ? strdup(cfg.status.token) : NULL;
        if (!sy_config_equal(&cfg, &back)) abort();
        sy_config_free(&back);
    }
    json_decref(j);
    sy_config_t copy;
    if (sy_config_copy(&copy, &cfg) == SY_OK && !sy_config_equal(&cfg, &copy)) abort();
    sy_config_free(&copy);
    sy_config_free(&cfg);
    return 0;
}
