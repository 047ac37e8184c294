/* `switchyard run`: a local cluster on this machine. Starts a coordinator and N workers as child
 * processes on loopback (free ports), shows one live progress line (step/total, loss, tokens/s,
 * workers, ETA), stops everything cleanly on Ctrl-C or at the end, and exits non-zero if the run
 * failed. Children's logs go to RUN.state_dir/logs/.
 *
 * Fault handling (docs/fault-tolerance.md): the launcher is the workers' parent, so it sees a
 * worker exit at once and reports it to the coordinator (POST /v1/workers/{id}/lost?pid=N with
 * the run's status token, which it generates when the config sets none). When every worker
 * has exited and none will be respawned it stops the coordinator and fails.
 *
 * `--chaos SPEC` injects faults (kill / SIGSTOP workers, kill -9 and restart the coordinator on
 * the same ports, respawn killed workers); each one is printed and appended to
 * RUN.state_dir/chaos.jsonl. The grammar is in `switchyard run --help`. */
#ifndef SY_LAUNCHER_H
#define SY_LAUNCHER_H

int sy_run_cli(int argc, char **argv);

#endif
