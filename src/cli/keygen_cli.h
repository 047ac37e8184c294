/* `switchyard keygen PATH`: a CurveZMQ key pair for the control plane (src/proto/curve.h). Writes
 * PATH.key (public + secret, mode 0600) and PATH.pub (public only); never overwrites.
 * Thread: the main thread of the CLI. */
#ifndef SY_KEYGEN_CLI_H
#define SY_KEYGEN_CLI_H

/* argv[0] is "keygen". Returns a process exit code (0 written, 1 error, 2 bad usage). */
int sy_keygen_cli(int argc, char **argv);

#endif
