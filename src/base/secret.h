/* Secrets that reach a process: bearer tokens read from files or the environment, and fresh
 * random tokens (issue 12 #3, docs/security.md). A secret never goes on a command line, where
 * every local user reads it (ps, /proc/PID/cmdline); a secret file must be accessible by its
 * owner only, as ssh asks of its keys.
 *
 * What this module does not do: CurveZMQ key files (src/proto/curve.h, same permission rule).
 * Thread: any; no state. */
#ifndef SY_SECRET_H
#define SY_SECRET_H

#include <stddef.h>

#include "base/status.h"

/* The environment variable a status-server token may come from (coordinator and clients). */
#define SY_STATUS_TOKEN_ENV "SY_STATUS_TOKEN"
/* Longest token accepted (bytes). */
#define SY_SECRET_MAX 512

/* Reads a one-line secret from `path` into out[n]: a regular file (a symlink to one is
 * followed, as in Kubernetes Secret volumes) with no permission bits for group or others, of at
 * most n - 1 bytes once one trailing newline ("\n" or "\r\n") is dropped, not empty, and of
 * printable ASCII without spaces (it goes into an HTTP header). Errors name `what` (e.g.
 * "status.token_file") and the path: SY_ENOTFOUND, SY_EIO, SY_EINVAL (permissions: the message
 * says "chmod 600 PATH"; not a regular file; too long; bad characters; empty). The buffer is
 * wiped before an error returns. */
sy_status sy_secret_read_file(const char *path, const char *what, char *out, size_t n);

/* The status server's bearer token, from the first of: `token` (status.token, a config field),
 * the file `token_file` (status.token_file, sy_secret_read_file), the environment variable
 * SY_STATUS_TOKEN. out = "" when none is set. A bad file or variable is an error naming it. */
sy_status sy_secret_status_token(const char *token, const char *token_file, char *out, size_t n);

/* 2 * n_bytes lowercase hex digits of getrandom(2) into out (size >= 2 * n_bytes + 1). A
 * failure of getrandom (an old kernel, a seccomp filter) is SY_EIO naming the errno: there is no
 * weaker fallback. */
sy_status sy_secret_random_hex(char *out, size_t n_bytes);

#endif
