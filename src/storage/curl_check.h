/* curl's error codes, translated where they enter (STYLE habit 3): the curl twin of SY_CHECK for
 * the layers that use libcurl (storage, cli). Header-only, so the base layer never links curl.
 *
 * sy_curl_status: the one map from CURLcode to sy_status (out of memory, timeout, a truncated
 * body, a malformed URL or unsupported scheme, else SY_EIO).
 * sy_curl_check: SY_OK for CURLE_OK; otherwise records the message "<context>: <why>", where why
 * is curl's error buffer when it holds text (CURLOPT_ERRORBUFFER; errbuf may be NULL) and
 * curl_easy_strerror otherwise, and returns the translated status.
 * SY_CURL_CHECK / SY_CURL_CHECK_GOTO: the return and goto-cleanup forms.
 * Thread: any (the message is thread-local). */
#ifndef SY_CURL_CHECK_H
#define SY_CURL_CHECK_H

#include <curl/curl.h>
#include <stdarg.h>
#include <stdio.h>

#include "base/status.h"

static inline sy_status sy_curl_status(CURLcode cc) {
    switch (cc) {
    case CURLE_OK: return SY_OK;
    case CURLE_OUT_OF_MEMORY: return SY_ENOMEM;
    case CURLE_OPERATION_TIMEDOUT: return SY_ETIMEOUT;
    case CURLE_PARTIAL_FILE: return SY_ECORRUPT;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL: return SY_EINVAL;
    default: return SY_EIO;
    }
}

/* curl's own words for a failure: the error buffer if it has any, else the code's name. */
static inline const char *sy_curl_why(CURLcode cc, const char *errbuf) {
    return errbuf && errbuf[0] ? errbuf : curl_easy_strerror(cc);
}

static inline sy_status sy_curl_check(CURLcode cc, const char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline sy_status sy_curl_check(CURLcode cc, const char *errbuf, const char *fmt, ...) {
    if (cc == CURLE_OK) return SY_OK;
    char ctx[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    return sy_err_set(sy_curl_status(cc), "%s: %s", ctx, sy_curl_why(cc, errbuf));
}

#define SY_CURL_CHECK(expr, errbuf, ...)                                          \
    do {                                                                          \
        sy_status sy_curl_st_ = sy_curl_check((expr), (errbuf), __VA_ARGS__);     \
        if (sy_curl_st_ != SY_OK) return sy_curl_st_;                             \
    } while (0)

#define SY_CURL_CHECK_GOTO(expr, errbuf, st, label, ...)                          \
    do {                                                                          \
        (st) = sy_curl_check((expr), (errbuf), __VA_ARGS__);                      \
        if ((st) != SY_OK) goto label;                                            \
    } while (0)

#endif
