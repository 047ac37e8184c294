/* Levelled one-line logging to stderr, tagged with the role ("train", "coord", "worker r3").
 * The level is checked before formatting. Thread-safe (one fprintf per line). */
#ifndef SY_LOG_H
#define SY_LOG_H

#include <stddef.h>

typedef enum { SY_LOG_DEBUG = 0, SY_LOG_INFO = 1, SY_LOG_WARN = 2, SY_LOG_ERROR = 3 } sy_log_level;

extern sy_log_level sy_log_threshold;

void sy_log_set_role(const char *role);
/* Reads SY_LOG=debug|info|warn|error from the environment. */
void sy_log_init_from_env(void);
/* A duration in seconds as "1h02m" or "3m07s" (progress lines); negative or NaN as "0m00s". */
void sy_log_fmt_duration(char *buf, size_t cap, double seconds);

void sy_log_write(sy_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define SY_LOG(lvl, ...)                                           \
    do {                                                           \
        if ((lvl) >= sy_log_threshold) sy_log_write((lvl), __VA_ARGS__); \
    } while (0)
#define sy_debug(...) SY_LOG(SY_LOG_DEBUG, __VA_ARGS__)
#define sy_info(...) SY_LOG(SY_LOG_INFO, __VA_ARGS__)
#define sy_warn(...) SY_LOG(SY_LOG_WARN, __VA_ARGS__)
#define sy_error(...) SY_LOG(SY_LOG_ERROR, __VA_ARGS__)

#endif
