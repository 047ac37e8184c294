/* `switchyard run`: a local cluster on this machine. Starts a coordinator and N workers as child
 * processes on loopback (free ports), shows one live progress line (step/total, loss, tokens/s,
 * workers, ETA), stops everything cleanly on Ctrl-C or at the end, and exits non-zero if the run
 * failed. Children's logs go to RUN.state_dir/logs/. */
#ifndef SY_LAUNCHER_H
#define SY_LAUNCHER_H

int sy_run_cli(int argc, char **argv);

#endif
