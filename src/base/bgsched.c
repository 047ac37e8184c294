#include "base/bgsched.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

pid_t sy_bg_self(void) { return (pid_t)syscall(SYS_gettid); }

int sy_bg_set(pid_t tid, bool background) {
    struct sched_param sp = {.sched_priority = 0};
    return sched_setscheduler(tid, background ? SCHED_IDLE : SCHED_OTHER, &sp) == 0 ? 0 : errno;
}

static bool g_available;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void *probe_main(void *arg) {
    (void)arg;
    const pid_t self = sy_bg_self();
    g_available = sy_bg_set(self, true) == 0 && sy_bg_set(self, false) == 0;
    return NULL;
}

static void probe(void) {
    pthread_t th;
    if (pthread_create(&th, NULL, probe_main, NULL) == 0) pthread_join(th, NULL);
}

bool sy_bg_available(void) {
    (void)pthread_once(&g_once, probe);
    return g_available;
}

/* ---- CPU sets ----------------------------------------------------------------------------- */

/* One decimal CPU number at *p (advanced past it): 0..CPU_SETSIZE-1, else -1. */
static long cpu_number(const char **p) {
    if (**p < '0' || **p > '9') return -1;
    long v = 0;
    while (**p >= '0' && **p <= '9') {
        v = v * 10 + (**p - '0');
        if (v >= CPU_SETSIZE) return -1;
        (*p)++;
    }
    return v;
}

bool sy_cpulist_parse(const char *s, cpu_set_t *out, char *why, size_t n) {
    CPU_ZERO(out);
    if (!s || !*s) return true;
    const char *p = s;
    for (;;) {
        const char *at = p;
        long lo = cpu_number(&p), hi = lo;
        if (lo >= 0 && *p == '-') {
            p++;
            hi = cpu_number(&p);
        }
        if (lo < 0 || hi < 0 || hi < lo || (*p && *p != ',')) {
            snprintf(why, n, "not a CPU list (at \"%s\"): CPU numbers 0-%d and ascending ranges, comma separated "
                     "(\"1\", \"2-3\", \"0,4-7\")", at, CPU_SETSIZE - 1);
            return false;
        }
        for (long c = lo; c <= hi; c++) CPU_SET((int)c, out);
        if (!*p) return true;
        p++;
    }
}

sy_cpulist_buf sy_cpulist_str(const cpu_set_t *set) {
    sy_cpulist_buf b = {.s = ""};
    size_t o = 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, set)) continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set)) e++;
        char item[32];
        int k = e > c ? snprintf(item, sizeof item, "%s%d-%d", o ? "," : "", c, e)
                      : snprintf(item, sizeof item, "%s%d", o ? "," : "", c);
        if (o + (size_t)k + 4 >= sizeof b.s) {
            snprintf(b.s + o, sizeof b.s - o, ",...");
            return b;
        }
        memcpy(b.s + o, item, (size_t)k + 1);
        o += (size_t)k;
        c = e;
    }
    return b;
}

int sy_affinity_set(pid_t tid, const cpu_set_t *set) {
    return sched_setaffinity(tid, sizeof *set, set) == 0 ? 0 : errno;
}

int sy_affinity_set_all(const cpu_set_t *set) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return errno;
    int first = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        int e = sy_affinity_set((pid_t)atoi(de->d_name), set);
        if (e && e != ESRCH && !first) first = e; /* ESRCH: the thread ended meanwhile */
    }
    closedir(d);
    return first;
}
