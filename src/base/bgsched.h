/* Background threads: Linux's SCHED_IDLE class for helper threads whose work may use only the
 * CPU time nothing else wants (docs/fault-tolerance.md "Replication in the background").
 *
 * A SCHED_IDLE thread runs when its core has nothing else to run; a thread whose caller must wait
 * for it is moved back to SCHED_OTHER (nice 0) for that wait, so that other load on the machine
 * cannot starve it while training waits. Linux lets a process leave SCHED_IDLE only if its
 * RLIMIT_NICE allows nice 0 (a soft limit of 20 or more) or it has CAP_SYS_NICE (root has it);
 * sy_bg_available says whether this process can go both ways, and nothing uses the class where
 * it cannot. */
#ifndef SY_BGSCHED_H
#define SY_BGSCHED_H

#include <stdbool.h>
#include <sys/types.h>

/* Whether threads of this process can be moved to SCHED_IDLE and back (probed once, on a
 * short-lived thread: the caller's own policy never changes). */
bool sy_bg_available(void);
/* Moves thread tid of this process to SCHED_IDLE (background) or SCHED_OTHER: 0, or an errno. */
int sy_bg_set(pid_t tid, bool background);
/* The calling thread's id (for sy_bg_set). */
pid_t sy_bg_self(void);

#endif
