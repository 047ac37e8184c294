#include "proto/curve.h"
#include "base/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "base/zmq_check.h"

/* Longest line read from a key file; a longer one is malformed. */
#define KEY_LINE_MAX 512
/* Largest key file read (a key file is ~150 bytes; an authorized-keys file one line a key). */
#define KEYSET_MAX_KEYS 100000

static const char Z85_CHARS[] =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

sy_status sy_curve_available(const char *what) {
    if (zmq_has("curve")) return SY_OK;
    int maj, min, pat;
    zmq_version(&maj, &min, &pat);
    return sy_err_set(SY_EINVAL,
                      "%s: this libzmq (%d.%d.%d) was built without CURVE support (zmq_has(\"curve\") "
                      "is false): install a libzmq built with libsodium, or leave the CURVE keys unset",
                      what, maj, min, pat);
}

bool sy_curve_z85_ok(const char *z85, uint8_t raw[32]) {
    if (!z85 || strlen(z85) != SY_CURVE_Z85_LEN) return false;
    for (const char *p = z85; *p; p++)
        if (!strchr(Z85_CHARS, *p)) return false;
    uint8_t tmp[32];
    if (!zmq_z85_decode(raw ? raw : tmp, z85)) return false;
    return true;
}

/* Why a would-be Z85 key is not one ("" if it is), for messages. */
static void z85_why(const char *s, size_t len, char *why, size_t n) {
    why[0] = 0;
    if (len != SY_CURVE_Z85_LEN) {
        snprintf(why, n, "a key is %d Z85 characters, this is %zu", SY_CURVE_Z85_LEN, len);
        return;
    }
    for (size_t i = 0; i < len; i++)
        if (!s[i] || !strchr(Z85_CHARS, s[i])) {
            snprintf(why, n, "character %zu (0x%02x) is not a Z85 character", i + 1, (unsigned char)s[i]);
            return;
        }
    char k[SY_CURVE_Z85_LEN + 1];
    memcpy(k, s, len);
    k[len] = 0;
    uint8_t raw[32];
    if (!zmq_z85_decode(raw, k)) snprintf(why, n, "it does not decode as Z85");
}

/* ---- reading ------------------------------------------------------------------------------ */

/* Strips leading and trailing blanks in place; returns the start. */
static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = 0;
    return s;
}

/* Reads the next line into buf; returns false at the end. A line too long is an error. */
static sy_status next_line(FILE *f, const char *path, int *lineno, char *buf, size_t n, bool *have) {
    *have = false;
    if (!fgets(buf, (int)n, f)) {
        if (ferror(f)) return sy_err_set(SY_EIO, "%s: read error: %s", path, strerror(errno));
        return SY_OK;
    }
    (*lineno)++;
    if (!strchr(buf, '\n') && !feof(f))
        return sy_err_set(SY_EFORMAT, "%s:%d: line longer than %d characters", path, *lineno, (int)n - 2);
    *have = true;
    return SY_OK;
}

/* Parses "name = value": name is [a-z-]+, and '=' is followed by a blank (Z85 keys may begin
 * with '='); false if the line has another shape. */
static bool split_assign(char *line, char **name, char **value) {
    char *p = line;
    while ((*p >= 'a' && *p <= 'z') || *p == '-') p++;
    if (p == line) return false;
    char *end = p;
    while (*p == ' ' || *p == '\t') p++;
    if (*p != '=' || (p[1] != ' ' && p[1] != '\t')) return false;
    *end = 0;
    *name = line;
    *value = trim(p + 1);
    return true;
}

static sy_status set_z85(const char *path, int lineno, const char *what, const char *v, char dst[41]) {
    char why[96];
    z85_why(v, strlen(v), why, sizeof why);
    if (why[0]) return sy_err_set(SY_EFORMAT, "%s:%d: %s: %s", path, lineno, what, why);
    memcpy(dst, v, SY_CURVE_Z85_LEN + 1);
    return SY_OK;
}

sy_status sy_curve_load_key(const char *path, bool need_secret, sy_curve_key *out) {
    memset(out, 0, sizeof *out);
    if (!path || !*path) return sy_err_set(SY_EINVAL, "no key file given");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return sy_err_set(e == ENOENT ? SY_ENOTFOUND : SY_EIO, "cannot open key file %s: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return sy_err_set(SY_EINVAL, "%s: not a regular file", path);
    }
    FILE *f = fdopen(fd, "r");
    if (!f) {
        close(fd);
        return sy_err_set(SY_EIO, "%s: %s", path, strerror(errno));
    }
    sy_status s = SY_OK;
    char buf[KEY_LINE_MAX + 2];
    int lineno = 0, pub_line = 0, sec_line = 0;
    for (;;) {
        bool have;
        SY_CHECK_GOTO(next_line(f, path, &lineno, buf, sizeof buf, &have), s, out);
        if (!have) break;
        char *line = trim(buf);
        if (!*line || *line == '#') continue;
        char *name, *value;
        if (!split_assign(line, &name, &value)) {
            s = sy_err_set(SY_EFORMAT, "%s:%d: expected 'public-key = KEY' or 'secret-key = KEY'", path, lineno);
            goto out;
        }
        if (!strcmp(name, "public-key") || !strcmp(name, "secret-key")) {
            bool pub = name[0] == 'p';
            int *seen = pub ? &pub_line : &sec_line;
            if (*seen) {
                s = sy_err_set(SY_EFORMAT, "%s:%d: %s given twice (first on line %d)", path, lineno, name, *seen);
                goto out;
            }
            *seen = lineno;
            SY_CHECK_GOTO(set_z85(path, lineno, name, value, pub ? out->public_z85 : out->secret_z85), s, out);
        } else {
            s = sy_err_set(SY_EFORMAT, "%s:%d: unknown entry '%s' (public-key, secret-key)", path, lineno, name);
            goto out;
        }
    }
    if (!pub_line) {
        s = sy_err_set(SY_EFORMAT, "%s: no 'public-key = KEY' line", path);
        goto out;
    }
    if (need_secret && !sec_line) {
        s = sy_err_set(SY_EFORMAT,
                       "%s: no 'secret-key = KEY' line (a .pub file? this needs the .key file of "
                       "`switchyard keygen`)",
                       path);
        goto out;
    }
    if (need_secret && (st.st_mode & 077)) {
        s = sy_err_set(SY_EINVAL,
                       "%s: permissions %04o are too open: a secret key file must be accessible by its "
                       "owner only (chmod 600 %s)",
                       path, (unsigned)(st.st_mode & 07777), path);
        goto out;
    }
    if (sec_line) {
        char derived[SY_CURVE_Z85_LEN + 1];
        if (zmq_curve_public(derived, out->secret_z85) != 0) {
            s = sy_curve_available(path);
            if (s == SY_OK)
                s = sy_err_set(SY_EFORMAT, "%s:%d: secret-key is not a CURVE secret key", path, sec_line);
            goto out;
        }
        if (strcmp(derived, out->public_z85) != 0) {
            s = sy_err_set(SY_EFORMAT, "%s:%d: public-key does not belong to the secret-key on line %d", path,
                           pub_line, sec_line);
            goto out;
        }
        out->has_secret = true;
    }
    if (!need_secret) sy_curve_key_wipe(out);
out:
    explicit_bzero(buf, sizeof buf);
    fclose(f);
    if (s != SY_OK) memset(out, 0, sizeof *out);
    return s;
}

void sy_curve_key_wipe(sy_curve_key *key) {
    if (!key) return;
    explicit_bzero(key->secret_z85, sizeof key->secret_z85);
    key->has_secret = false;
}

/* ---- writing ------------------------------------------------------------------------------ */

/* A new key file: never replaces anything at path, and has exactly `mode` whatever the umask. */
static sy_status write_new(const char *path, mode_t mode, const char *text) {
    return sy_fs_write_atomic(path, text, strlen(text), mode, SY_FS_NO_REPLACE | SY_FS_EXACT_MODE);
}

sy_status sy_curve_keygen(const char *prefix, char *key_path, char *pub_path, size_t n) {
    if (!prefix || !*prefix) return sy_err_set(SY_EINVAL, "keygen: no path given");
    SY_CHECK(sy_curve_available("keygen"));
    char kp[4096], pp[4096];
    if ((size_t)snprintf(kp, sizeof kp, "%s.key", prefix) >= sizeof kp ||
        (size_t)snprintf(pp, sizeof pp, "%s.pub", prefix) >= sizeof pp)
        return sy_err_set(SY_EINVAL, "keygen: path '%s' is too long", prefix);
    struct stat st;
    if (lstat(kp, &st) == 0) return sy_err_set(SY_EEXIST, "%s exists already: not overwriting it", kp);
    if (lstat(pp, &st) == 0) return sy_err_set(SY_EEXIST, "%s exists already: not overwriting it", pp);
    char pub[SY_CURVE_Z85_LEN + 1], sec[SY_CURVE_Z85_LEN + 1];
    SY_CHECK_ZMQ(zmq_curve_keypair(pub, sec), "zmq_curve_keypair");
    char text[512];
    snprintf(text, sizeof text,
             "# switchyard CURVE key pair (switchyard keygen). Keep it secret: mode 0600.\n"
             "# The public half is in %s.pub.\n"
             "public-key = %s\n"
             "secret-key = %s\n",
             prefix, pub, sec);
    sy_status s = write_new(kp, 0600, text);
    explicit_bzero(text, sizeof text);
    explicit_bzero(sec, sizeof sec);
    if (s != SY_OK) return s;
    snprintf(text, sizeof text,
             "# switchyard CURVE public key (switchyard keygen); its secret half is %s.key.\n"
             "public-key = %s\n",
             prefix, pub);
    s = write_new(pp, 0644, text);
    if (s != SY_OK) {
        unlink(kp);
        return s;
    }
    if (key_path) snprintf(key_path, n, "%s", kp);
    if (pub_path) snprintf(pub_path, n, "%s", pp);
    return SY_OK;
}

/* ---- authorized keys ---------------------------------------------------------------------- */

struct sy_curve_keyset {
    uint8_t (*keys)[32];
    int n, cap;
};

static sy_status keyset_add(sy_curve_keyset_t *set, const uint8_t key[32]) {
    if (sy_curve_keyset_has(set, key)) return SY_OK;
    if (set->n == set->cap) {
        int nc = set->cap ? 2 * set->cap : 16;
        void *nk = realloc(set->keys, (size_t)nc * 32);
        if (!nk) return sy_err_set(SY_ENOMEM, "out of memory");
        set->keys = nk;
        set->cap = nc;
    }
    memcpy(set->keys[set->n++], key, 32);
    return SY_OK;
}

sy_status sy_curve_keyset_load(const char *path, sy_curve_keyset_t **out) {
    *out = NULL;
    if (!path || !*path) return sy_err_set(SY_EINVAL, "no authorized-keys file given");
    FILE *f = fopen(path, "re");
    if (!f) {
        int e = errno;
        return sy_err_set(e == ENOENT ? SY_ENOTFOUND : SY_EIO, "cannot open authorized-keys file %s: %s", path,
                          strerror(e));
    }
    sy_curve_keyset_t *set = calloc(1, sizeof *set);
    sy_status s = set ? SY_OK : sy_err_set(SY_ENOMEM, "out of memory");
    char buf[KEY_LINE_MAX + 2];
    int lineno = 0;
    while (s == SY_OK) {
        bool have;
        SY_CHECK_GOTO(next_line(f, path, &lineno, buf, sizeof buf, &have), s, out);
        if (!have) break;
        char *line = trim(buf);
        if (!*line || *line == '#') continue;
        char *key = line, *name, *value;
        bool assigned = false;
        if (!strncmp(line, "secret-key", 10)) {
            s = sy_err_set(SY_EFORMAT,
                           "%s:%d: a secret key: list public keys only (the .pub files of `switchyard keygen`)",
                           path, lineno);
            goto out;
        }
        if (!strncmp(line, "public-key", 10) && split_assign(line, &name, &value)) {
            if (strcmp(name, "public-key")) {
                s = sy_err_set(SY_EFORMAT, "%s:%d: expected 'public-key = KEY' or a bare key", path, lineno);
                goto out;
            }
            key = value;
            assigned = true;
        }
        size_t len = strcspn(key, " \t"); /* a bare key may be followed by a comment */
        if (key[len] && assigned) {
            s = sy_err_set(SY_EFORMAT, "%s:%d: text after the key", path, lineno);
            goto out;
        }
        key[len] = 0;
        char why[96];
        z85_why(key, len, why, sizeof why);
        if (why[0]) {
            s = sy_err_set(SY_EFORMAT, "%s:%d: not a public key: %s", path, lineno, why);
            goto out;
        }
        if (set->n >= KEYSET_MAX_KEYS) {
            s = sy_err_set(SY_EFORMAT, "%s:%d: more than %d keys", path, lineno, KEYSET_MAX_KEYS);
            goto out;
        }
        uint8_t raw[32];
        zmq_z85_decode(raw, key);
        SY_CHECK_GOTO(keyset_add(set, raw), s, out);
    }
    if (s == SY_OK && set->n == 0)
        s = sy_err_set(SY_EFORMAT, "%s: lists no public key (every worker would be refused)", path);
out:
    fclose(f);
    if (s != SY_OK) sy_curve_keyset_destroy(&set);
    *out = set;
    return s;
}

int sy_curve_keyset_size(const sy_curve_keyset_t *set) { return set ? set->n : 0; }

bool sy_curve_keyset_has(const sy_curve_keyset_t *set, const uint8_t key[32]) {
    for (int i = 0; set && i < set->n; i++)
        if (!memcmp(set->keys[i], key, 32)) return true;
    return false;
}

void sy_curve_keyset_destroy(sy_curve_keyset_t **set_p) {
    if (!set_p || !*set_p) return;
    free((*set_p)->keys);
    free(*set_p);
    *set_p = NULL;
}
