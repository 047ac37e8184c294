#include "base/endpoint.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Longest endpoint accepted (ZeroMQ keeps them in fixed buffers of about this size). */
#define EP_MAX_LEN 255

static bool all_digits_dots(const char *h, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)h[i]) && h[i] != '.') return false;
    return n > 0;
}

/* A DNS name: labels of [A-Za-z0-9-] (1..63, not starting or ending with '-'), '.'-separated. */
static bool dns_name(const char *h, size_t n) {
    if (n == 0 || n > 253) return false;
    size_t label = 0;
    for (size_t i = 0; i <= n; i++) {
        char ch = i < n ? h[i] : '.';
        if (ch == '.') {
            if (label == 0 && i < n) return false;
            if (label && (h[i - 1] == '-' || h[i - label] == '-')) return false;
            label = 0;
        } else if (isalnum((unsigned char)ch) || ch == '-') {
            if (++label > 63) return false;
        } else {
            return false;
        }
    }
    return true;
}

static sy_status bad(const char *what, const char *ep, const char *why, bool bind) {
    return sy_err_set(SY_EINVAL, "%s '%s': %s (expected tcp://HOST:PORT%s or ipc://PATH)", what, ep, why,
                      bind ? ", HOST may be * and PORT * or 0 for any free port," : "");
}

sy_status sy_endpoint_check(const char *ep, bool bind, const char *what) {
    if (!ep || !*ep) return bad(what, "", "empty", bind);
    if (strlen(ep) > EP_MAX_LEN) return bad(what, ep, "longer than 255 characters", bind);
    for (const char *p = ep; *p; p++)
        if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e) return bad(what, ep, "contains a space or a control character", bind);
    if (!strncmp(ep, "ipc://", 6)) {
        if (!ep[6]) return bad(what, ep, "no path after ipc://", bind);
        return SY_OK;
    }
    if (strncmp(ep, "tcp://", 6) != 0) {
        const char *sep = strstr(ep, "://");
        return bad(what, ep, sep ? "unsupported transport (only tcp:// and ipc://)" : "no transport (tcp://)", bind);
    }
    const char *hp = ep + 6;
    if (strchr(hp, ';')) return bad(what, ep, "a source address (';') is not supported", bind);
    const char *colon = strrchr(hp, ':');
    if (!colon) return bad(what, ep, "no port (tcp://HOST:PORT)", bind);
    const char *port = colon + 1;
    size_t hn = (size_t)(colon - hp);
    /* port */
    if (!*port) return bad(what, ep, "empty port", bind);
    if (!(bind && !strcmp(port, "*"))) {
        char *end;
        long v = strtol(port, &end, 10);
        if (*end || !isdigit((unsigned char)*port)) return bad(what, ep, "the port is not a number", bind);
        if (v > 65535) return bad(what, ep, "port out of range (1..65535)", bind);
        if (v == 0 && !bind) return bad(what, ep, "port 0 (a port to connect to is 1..65535)", bind);
    }
    /* host */
    if (hn == 0) return bad(what, ep, "empty host", bind);
    if (bind && hn == 1 && hp[0] == '*') return SY_OK;
    char host[EP_MAX_LEN + 1];
    memcpy(host, hp, hn);
    host[hn] = 0;
    if (host[0] == '[') {
        unsigned char a6[16];
        if (hn < 3 || host[hn - 1] != ']') return bad(what, ep, "an IPv6 host is written [ADDRESS]", bind);
        host[hn - 1] = 0;
        if (inet_pton(AF_INET6, host + 1, a6) != 1) return bad(what, ep, "not a valid IPv6 address", bind);
        return SY_OK;
    }
    if (all_digits_dots(host, hn)) {
        struct in_addr a4;
        if (inet_pton(AF_INET, host, &a4) != 1)
            return bad(what, ep, "not a valid IPv4 address (four numbers 0..255)", bind);
        return SY_OK;
    }
    if (!dns_name(host, hn)) return bad(what, ep, "not a valid host name", bind);
    return SY_OK;
}

/* A host (no brackets) that is loopback: see sy_endpoint_is_loopback. */
static bool host_is_loopback(const char *host) {
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1) {
        if (IN6_IS_ADDR_LOOPBACK(&a6)) return true;
        return IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127;
    }
    return !strcasecmp(host, "localhost") || !strcasecmp(host, "localhost.");
}

bool sy_endpoint_is_loopback(const char *addr) {
    if (!addr) return false;
    if (!strncmp(addr, "ipc://", 6)) return addr[6] != 0;
    const char *hp = !strncmp(addr, "tcp://", 6) ? addr + 6 : addr;
    if (strstr(hp, "://")) return false; /* another transport */
    const char *colon = strrchr(hp, ':');
    if (!colon || colon == hp) return false;
    size_t hn = (size_t)(colon - hp);
    char host[EP_MAX_LEN + 1];
    if (hn > EP_MAX_LEN) return false;
    memcpy(host, hp, hn);
    host[hn] = 0;
    if (host[0] == '[') {
        if (hn < 3 || host[hn - 1] != ']') return false;
        host[hn - 1] = 0;
        struct in6_addr a6;
        if (inet_pton(AF_INET6, host + 1, &a6) != 1) return false;
        return host_is_loopback(host + 1);
    }
    if (strchr(host, ':')) return false; /* an IPv6 address without brackets: ambiguous */
    return host_is_loopback(host);
}
