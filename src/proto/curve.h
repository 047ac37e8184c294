/* CurveZMQ key files for the control plane (system spec §2 "Security"; docs/protocol.md).
 *
 * The cryptography is libzmq's (zmq_curve_keypair, zmq_z85_*, ZMQ_CURVE_* socket options);
 * this module only reads and writes the key files and keeps a set of authorized public keys.
 *
 *   NAME.key  a key pair, mode 0600:        NAME.pub  the public half:
 *     # comment lines                          # comment lines
 *     public-key = <40 Z85 characters>         public-key = <40 Z85 characters>
 *     secret-key = <40 Z85 characters>
 *
 *   authorized keys (cluster.curve_authorized_keys): one worker public key per line, either
 *   bare ("<40 Z85> optional comment") or as a .pub file writes it ("public-key = <40 Z85>"),
 *   so `cat w1.pub w2.pub > authorized` works; '#' starts a comment; blank lines are skipped.
 *
 * A secret key file readable or writable by group or others is refused (as ssh does): the
 * secret key is the worker's or coordinator's identity.
 *
 * Errors: SY_ENOTFOUND (no such file), SY_EIO, SY_EFORMAT (malformed: the message names the
 * file and the line), SY_EINVAL (permissions, mismatched halves), SY_EEXIST (keygen would
 * overwrite). Thread: any; nothing is shared. */
#ifndef SY_CURVE_H
#define SY_CURVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#define SY_CURVE_Z85_LEN 40 /* a 32-byte key in Z85 */

typedef struct {
    char public_z85[SY_CURVE_Z85_LEN + 1];
    char secret_z85[SY_CURVE_Z85_LEN + 1]; /* "" when loaded from a .pub file */
    bool has_secret;
} sy_curve_key;

/* SY_OK when this libzmq was built with CURVE (zmq_has("curve")); else SY_EINVAL with a
 * message saying so, prefixed by `what` (e.g. "cluster.curve_server_key"). */
sy_status sy_curve_available(const char *what);

/* Makes a fresh key pair and writes PREFIX.key (mode 0600) and PREFIX.pub. Refuses to
 * overwrite either file (SY_EEXIST, nothing written). The written paths go to key_path /
 * pub_path when not NULL (buffers of `n` bytes). */
sy_status sy_curve_keygen(const char *prefix, char *key_path, char *pub_path, size_t n);

/* Loads a key file. need_secret: the file must hold a secret key (a .key file; its public key
 * must match the secret, and the file must not be accessible by group or others); otherwise a
 * .pub file, or a .key file of which only the public key is used. */
sy_status sy_curve_load_key(const char *path, bool need_secret, sy_curve_key *out);

/* Overwrites the secret of a loaded key (call when done with it). */
void sy_curve_key_wipe(sy_curve_key *key);

/* True when z85 is 40 characters that decode to a 32-byte key (into raw, when not NULL). */
bool sy_curve_z85_ok(const char *z85, uint8_t raw[32]);

/* ---- the set of authorized public keys ------------------------------------------------ */

typedef struct sy_curve_keyset sy_curve_keyset_t;

/* Loads an authorized-keys file; a file listing no key is an error (every worker would be
 * refused). Caller owns *out (sy_curve_keyset_destroy). */
sy_status sy_curve_keyset_load(const char *path, sy_curve_keyset_t **out);
int sy_curve_keyset_size(const sy_curve_keyset_t *set);
/* True when the 32-byte public key is in the set. */
bool sy_curve_keyset_has(const sy_curve_keyset_t *set, const uint8_t key[32]);
void sy_curve_keyset_destroy(sy_curve_keyset_t **set_p);

#endif
