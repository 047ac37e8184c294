/* `switchyard ckpt ls | show | export`: inspect, verify and export checkpoints in any store
 * (system spec §5). Thread: the calling thread. */
#ifndef SY_CKPT_CLI_H
#define SY_CKPT_CLI_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* Splits "STORE/RUN[@STEP]" at the last '/' into the store URL and the run name (a trailing '/'
 * is ignored; no '/' at all: the store is "."). *step = -1 when no @STEP is given. store and run
 * get at most cap bytes each. SY_EINVAL naming the argument if malformed. */
sy_status sy_ckpt_cli_split(const char *arg, char *store, char *run, size_t cap, int64_t *step);

/* argv[0] is "ckpt". Returns a process exit code (0 ok, 1 failure, 2 usage). */
int sy_ckpt_cli(int argc, char **argv);

#endif
