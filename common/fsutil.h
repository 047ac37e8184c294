/* Small file-system helpers shared by the CLI, the coordinator and the data tools. */
#ifndef SY_FSUTIL_H
#define SY_FSUTIL_H

#include "status.h"

/* mkdir -p: creates `path` and its missing parents (mode 0755). SY_OK if it exists as a folder
 * afterwards; otherwise SY_EINVAL (too long, or a file is in the way) or SY_EIO, with a message
 * naming the folder that could not be made. */
sy_status sy_mkdir_p(const char *path);

#endif
