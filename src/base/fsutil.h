/* Small file-system helpers shared by the CLI, the coordinator and the data tools. */
#ifndef SY_FSUTIL_H
#define SY_FSUTIL_H

#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>

#include "base/status.h"

/* mkdir -p: creates `path` and its missing parents (mode 0755). SY_OK if it exists as a folder
 * afterwards; otherwise SY_EINVAL (too long, or a file is in the way) or SY_EIO, with a message
 * naming the folder that could not be made. */
sy_status sy_mkdir_p(const char *path);

/* Output files: every writer of the project replaces or appends to regular files only, never a
 * device node, FIFO, socket, folder or symbolic link that happens to sit at the path (a
 * `--out /dev/full` must not turn the device into a file, a symlink must not redirect a write).
 *
 * sy_fs_check_replaceable: SY_OK if nothing is at `path` or a regular file is (lstat: a symlink
 * is not followed); else SY_EINVAL naming the path and what is there. Writers that write a temp
 * file and rename it over `path` call it before they start and again just before the rename.
 *
 * sy_fs_open_regular: opens `path` for writing, creating it (mode 0644) if absent, with
 * O_NOFOLLOW and without blocking on a FIFO, then checks that it is a regular file before
 * truncating (append = 0) or appending (append = 1). Returns the descriptor (O_CLOEXEC) or -1
 * with the error message set (SY_EINVAL for something that is not a regular file, SY_EIO).
 * sy_fs_fopen_regular: the same as a FILE * ("w" or "a" semantics), NULL on failure. */
sy_status sy_fs_check_replaceable(const char *path);
int sy_fs_open_regular(const char *path, int append);
FILE *sy_fs_fopen_regular(const char *path, int append);

/* Atomic file writing: the bytes go to a temp file beside `path`, which is fsynced, closed and
 * then renamed over `path` (or linked to it without replacing anything), and the folder is
 * fsynced, so a reader or a crash sees the old file or the whole new one, never a part. The one
 * implementation of that sequence for every writer of the project (shards, safetensors, the local
 * object store, key files).
 *
 *     sy_fs_atomic w;
 *     SY_CHECK(sy_fs_atomic_open(&w, path, NULL, 0644, 0));
 *     st = sy_fs_atomic_write(&w, buf, len);            (or write to w.fd directly)
 *     if (st == SY_OK) st = sy_fs_atomic_commit(&w);
 *     sy_fs_atomic_close(&w);                            (always: removes the temp file on failure)
 *
 * Flags:
 *   SY_FS_NO_REPLACE  commit with link(2) (renameat2 RENAME_NOREPLACE where the filesystem has no
 *                     hard links): SY_EEXIST "<path> exists already: not overwriting it" if
 *                     anything is at `path`. Without it, `path` must be absent or a regular file
 *                     (sy_fs_check_replaceable, checked at open and again just before the rename).
 *   SY_FS_EXACT_MODE  fchmod the file to `mode`, so the umask does not narrow it.
 *   SY_FS_DIR_SYNC_BEST_EFFORT  a folder that cannot be fsynced is not an error (some
 *                     filesystems refuse fsync on folders); by default it is (SY_EIO).
 *
 * Messages name the file and the step: "<path>: cannot create temporary file <tmp>: <errno
 * text>", "<tmp>: write: ...", "<tmp>: fsync: ...",
 * "<tmp>: close: ...", "<path>: rename from <tmp>: ...", "<path>: fsync of its directory: ...".
 * w.err holds the errno of the step that failed (0 if none), for callers that retry (a folder
 * removed under an open: ENOENT).
 *
 * Not thread-safe per writer; distinct writers may run on any threads at once. */
enum { SY_FS_NO_REPLACE = 1, SY_FS_EXACT_MODE = 2, SY_FS_DIR_SYNC_BEST_EFFORT = 4 };

typedef struct {
    char *path;  /* owned copy of the target path */
    char *tmp;   /* owned: the temp file's name; "" once it is committed */
    int fd;      /* the temp file, open for writing; -1 after commit or close */
    int flags;
    mode_t mode;
    int err;     /* errno of the failed step, 0 if none */
} sy_fs_atomic;

/* Creates the temp file: `tmp_name` if given (it must sit in path's folder), else
 * "<path>.tmp.<pid>.<n>". On failure w is left closed (sy_fs_atomic_close is still safe). */
sy_status sy_fs_atomic_open(sy_fs_atomic *w, const char *path, const char *tmp_name, mode_t mode, int flags);
/* Writes all of buf to the temp file. */
sy_status sy_fs_atomic_write(sy_fs_atomic *w, const void *buf, size_t len);
/* fsync, close, rename (or link), folder fsync. After it w.fd is -1; close w either way. */
sy_status sy_fs_atomic_commit(sy_fs_atomic *w);
/* Closes the temp file and removes it unless committed; frees w's names. Safe to call twice. */
void sy_fs_atomic_close(sy_fs_atomic *w);

/* The whole sequence for one buffer. */
sy_status sy_fs_write_atomic(const char *path, const void *buf, size_t len, mode_t mode, int flags);

#endif
