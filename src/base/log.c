#include "base/log.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

sy_log_level sy_log_threshold = SY_LOG_INFO;
static char log_role[32] = "switchyard";

void sy_log_set_role(const char *role) { snprintf(log_role, sizeof log_role, "%s", role); }

void sy_log_init_from_env(void) {
    const char *v = getenv("SY_LOG");
    if (!v) return;
    if (!strcmp(v, "debug")) sy_log_threshold = SY_LOG_DEBUG;
    else if (!strcmp(v, "info")) sy_log_threshold = SY_LOG_INFO;
    else if (!strcmp(v, "warn")) sy_log_threshold = SY_LOG_WARN;
    else if (!strcmp(v, "error")) sy_log_threshold = SY_LOG_ERROR;
}

void sy_log_write(sy_log_level lvl, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    char msg[2048];
    struct timespec ts;
    struct tm tm;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%02d:%02d:%02d.%03ld %s %s: %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, log_role, names[lvl], msg);
}

void sy_log_fmt_duration(char *buf, size_t cap, double s) {
    if (!(s >= 0) || !isfinite(s)) s = 0;
    int h = (int)(s / 3600), mi = (int)(fmod(s, 3600) / 60), se = (int)fmod(s, 60);
    if (h > 0) snprintf(buf, cap, "%dh%02dm", h, mi);
    else snprintf(buf, cap, "%dm%02ds", mi, se);
}
