#include "base/bgsched.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
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
