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

#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Whether threads of this process can be moved to SCHED_IDLE and back (probed once, on a
 * short-lived thread: the caller's own policy never changes). */
bool sy_bg_available(void);
/* Moves thread tid of this process to SCHED_IDLE (background) or SCHED_OTHER: 0, or an errno. */
int sy_bg_set(pid_t tid, bool background);
/* The calling thread's id (for sy_bg_set). */
pid_t sy_bg_self(void);

/* CPU sets for cluster.replica_cpus (docs/fault-tolerance.md "A core for the replication").
 *
 * sy_cpulist_parse reads Linux's CPU list form ("1", "2-3", "0,4-7"; what `taskset -c` and
 * /sys/devices/system/cpu/online use): true and *out, or false with why filled in (each CPU below
 * CPU_SETSIZE, ranges ascending, no empty entries; "" is the empty set). */
bool sy_cpulist_parse(const char *s, cpu_set_t *out, char *why, size_t n);
typedef struct {
    char s[160];
} sy_cpulist_buf;
/* The set in the same form ("0-1,4"; "" when empty; "...," ending a list too long to print). */
sy_cpulist_buf sy_cpulist_str(const cpu_set_t *set);
/* Restricts thread tid of this process (0: the caller) to these CPUs: 0, or an errno (EINVAL:
 * none of them is a CPU the process may use). */
int sy_affinity_set(pid_t tid, const cpu_set_t *set);
/* The same for every thread of this process (threads started later inherit their creator's set):
 * 0, or the first errno (the others are still tried). */
int sy_affinity_set_all(const cpu_set_t *set);

#endif
