/* base/module.h: the search path and dlopen of an optional module */
#include "base/module.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* dlopen one candidate; true when it loaded and `accept` kept it */
static bool try_load(const sy_module_spec *spec, const char *path, sy_module_accept_fn accept,
                     void *ctx, char *err, size_t err_len) {
    if (access(path, F_OK) != 0) return false;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(err, err_len, "cannot load %s %.400s: %.400s (%s)", spec->what, path, dlerror(),
                 spec->dlopen_hint);
        return false;
    }
    if (!accept(h, path, ctx, err, err_len)) {
        dlclose(h);
        return false;
    }
    return true; /* kept loaded for the process's life */
}

bool sy_module_load(const sy_module_spec *spec, sy_module_accept_fn accept, void *ctx, char *err,
                    size_t err_len) {
    char cand[5][PATH_MAX + 64];
    int nc = 0;
    const char *env = getenv(spec->env_var);
    if (env && env[0]) snprintf(cand[nc++], sizeof cand[0], "%s", env);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            snprintf(cand[nc++], sizeof cand[0], "%s/%s", exe, spec->file);
            snprintf(cand[nc++], sizeof cand[0], "%s/../%s", exe, spec->file);
            snprintf(cand[nc++], sizeof cand[0], "%s/../lib/switchyard/%s", exe, spec->file);
        }
    }
    snprintf(cand[nc++], sizeof cand[0], "%s", spec->build_path);
    err[0] = 0;
    for (int i = 0; i < nc; i++)
        if (try_load(spec, cand[i], accept, ctx, err, err_len)) return true;
    if (!err[0])
        snprintf(err, err_len, "%s %s was not found (looked beside the executable, in "
                 "../lib/switchyard/, in %s; %s=PATH names it)", spec->what, spec->file,
                 spec->build_path, spec->env_var);
    return false;
}
