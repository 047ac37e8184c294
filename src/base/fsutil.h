/* Small file-system helpers shared by the CLI, the coordinator and the data tools. */
#ifndef SY_FSUTIL_H
#define SY_FSUTIL_H

#include <stdio.h>

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

#endif
