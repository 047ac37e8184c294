/* `switchyard sample`: text from a checkpoint. The prompt's bytes are the first tokens (the
 * byte-level tokenizer of `switchyard data prepare`, vocab 256); each next byte is drawn from the
 * model's distribution for the last position (temperature, top-k), with the eval capacity factor
 * and every expert local, until --length bytes are generated. The context is the last seq_len
 * tokens. Deterministic: the same checkpoint, prompt, options and seed give the same text (the
 * draws are keyed by seed and position, the forward is deterministic on the CPU backend).
 * Thread: the calling thread. */
#ifndef SY_SAMPLE_CLI_H
#define SY_SAMPLE_CLI_H

/* argv[0] is the command name. Returns the exit code: 0 done, 1 failed (no checkpoint, a corrupt
 * one, a model that is not byte-level), 2 bad usage. */
int sy_sample_cli(int argc, char **argv);

#endif
