/* Helpers shared by the fuzz harnesses (tests/fuzz/fuzz_*.c): a per-process temp folder that
 * every input reuses (removed at exit), and writing an input to a file in it. For the
 * harnesses only. */
#ifndef SY_FUZZ_UTIL_H
#define SY_FUZZ_UTIL_H

#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/log.h"

static char fz_dir[256];

static inline int fz_rm(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static inline void fz_cleanup(void) {
    if (fz_dir[0]) nftw(fz_dir, fz_rm, 16, FTW_DEPTH | FTW_PHYS);
}

/* The process's temp folder (created on first use), or NULL if it cannot be made. Also quiets
 * the project's log: the harnesses feed bad input on purpose. */
static inline const char *fz_tmpdir(void) {
    if (!fz_dir[0]) {
        sy_log_threshold = (sy_log_level)(SY_LOG_ERROR + 1);
        snprintf(fz_dir, sizeof fz_dir, "/tmp/sy-fuzz-XXXXXX");
        if (!mkdtemp(fz_dir)) {
            fz_dir[0] = 0;
            return NULL;
        }
        atexit(fz_cleanup);
    }
    return fz_dir;
}

/* Writes data to <tmpdir>/<name> (path into `path`, `cap` bytes); 0 on success. */
static inline int fz_write(const char *name, const uint8_t *data, size_t size, char *path, size_t cap) {
    const char *d = fz_tmpdir();
    if (!d) return -1;
    snprintf(path, cap, "%s/%s", d, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = size ? fwrite(data, 1, size, f) : 0;
    int rc = fclose(f);
    return (w == size && rc == 0) ? 0 : -1;
}

/* A NUL-terminated malloc'ed copy of the input (NULL if out of memory). */
static inline char *fz_str(const uint8_t *data, size_t size) {
    char *s = malloc(size + 1);
    if (!s) return NULL;
    if (size) memcpy(s, data, size);
    s[size] = 0;
    return s;
}

#endif
