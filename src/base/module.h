/* Finding and loading an optional module (a shared library dlopen'ed on first use, such as the
 * CUDA backend's and the NCCL data plane's), so that a process that never uses it never loads it.
 *
 * Where a module FILE is looked for, first found wins: $ENV_VAR (a path); beside the
 * executable; one folder up (tests and benchmarks live in build/tests, build/bench); in
 * ../lib/switchyard/ from the executable (`cmake --install`); BUILD_PATH (where the build put
 * it). A candidate that does not exist is skipped; one that exists is dlopen'ed (RTLD_NOW |
 * RTLD_LOCAL) and handed to the caller's `accept`, which checks it (its symbol, its ABI) and
 * either keeps it (returns true: the handle stays open for the process's life) or writes why not
 * into err and returns false (sy_module_load then dlcloses it and tries the next).
 *
 * Errors: the last reason a candidate was refused, or, where none existed, a "not found" line
 * naming FILE, where it was looked for and ENV_VAR; `what` names the module in both
 * ("the CUDA backend module"), `dlopen_hint` follows the loader's reason when dlopen fails
 * ("are the CUDA runtime and cuBLAS libraries installed and on the library path?").
 * Not thread-safe by itself: callers run it once (pthread_once). */
#ifndef SY_BASE_MODULE_H
#define SY_BASE_MODULE_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    const char *what;        /* "the NCCL module" */
    const char *env_var;     /* "SY_NCCL_MODULE" */
    const char *file;        /* "libsy_comm_nccl.so" */
    const char *build_path;  /* the file in the build folder */
    const char *dlopen_hint; /* appended in parentheses to a dlopen failure */
} sy_module_spec;

/* handle: the dlopen'ed candidate at path; true keeps it, false (with err written) refuses it */
typedef bool (*sy_module_accept_fn)(void *handle, const char *path, void *ctx, char *err,
                                    size_t err_len);

/* True when a candidate was accepted; false with err (never empty) saying why none was. */
bool sy_module_load(const sy_module_spec *spec, sy_module_accept_fn accept, void *ctx, char *err,
                    size_t err_len);

#endif /* SY_BASE_MODULE_H */
