/* Checkpoints in an object store (system spec §5).
 *
 * Layout under `<run>/ckpt/step-%09lld/` in the store:
 *   dense.safetensors, dense.optim.safetensors      non-expert params / their moments (m.<name>, v.<name>)
 *   expert-%04d.safetensors, expert-%04d.optim.safetensors   one expert index, every layer
 *   MANIFEST.json                                   written LAST with put_if_absent: the commit point
 * A distributed save (sy_ckpt_write_part_tagged) stores each file as the object
 * "g<generation>-r<rank>.<file>"; its manifest entry keeps "name" = <file> and adds "object"
 * (docs/fault-tolerance.md "Stale workers"). Loaders ask by name and read the object.
 * A step folder without a MANIFEST.json is debris of an unfinished save and does not exist as a
 * checkpoint. The module is layout-agnostic beyond that: the caller names the files and the
 * tensors in each (sy_ckpt_file_dense() etc. give the standard names), so a restore can load
 * dense + any subset of experts by calling sy_ckpt_load_group() for just those files.
 *
 * Manifest: {"format": "switchyard-ckpt", "version": 1, "run": ..., "step": ...,
 *            "created": "2024-01-01T00:00:00Z",
 *            "files": [{"name": ..., "size": ..., "sha256": "<hex>"}, ...], ...extra fields}
 * Tensors are stored as F32 (fp32 master weights and moments, bit-exact).
 * Saving writes up to 4 files at once (threads), so the store must accept concurrent puts
 * (both backends do). Each file goes to the store as its header plus the tensors' own buffers
 * (sy_store_putv: no serialised copy on the local store), and its SHA-256 is taken over the
 * bytes as they are handed to the store, so tensor buffers must not change during a save.
 *
 * Ownership: groups and their buffers stay the caller's; json_t results are new references
 * (json_decref them). Thread: any; concurrent saves of the same step race on put_if_absent:
 * one commits, the other gets SY_EEXIST (its data files may have overwritten the winner's with
 * different bytes, so callers must not save one step twice concurrently). */
#ifndef SY_CKPT_H
#define SY_CKPT_H

#include <jansson.h>
#include <stdint.h>

#include "base/status.h"
#include "storage/store.h"
#include "base/tensor.h"

#define SY_CKPT_FORMAT "switchyard-ckpt"
#define SY_CKPT_VERSION 1
#define SY_CKPT_MANIFEST "MANIFEST.json"

/* One safetensors file of a checkpoint: its file name (a single key component, e.g.
 * "dense.safetensors") and the tensors in it (saved from / loaded into t->data). */
typedef struct {
    const char *file;
    const sy_tensor_ref *tensors;
    int n;
} sy_ckpt_group;

/* Standard file names, written into buf (≥ 40 bytes); return buf. */
const char *sy_ckpt_file_dense(char *buf, size_t cap, int optim);
const char *sy_ckpt_file_expert(char *buf, size_t cap, int expert, int optim);

/* Store key of a file of a checkpoint ("<run>/ckpt/step-%09lld/<file>") into buf; SY_EINVAL if
 * it does not fit or is not a valid key. */
sy_status sy_ckpt_key(char *buf, size_t cap, const char *run, int64_t step, const char *file);

/* Saves a checkpoint: every group as one F32 safetensors object, then the manifest (with the
 * caller's `extra` JSON object fields merged in: config, optimizer step count, RNG state, data
 * position...; may be NULL; it may not use the reserved keys above). SY_EEXIST without
 * writing anything if this step is already committed. */
sy_status sy_ckpt_save(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *groups,
                       int n_groups, const json_t *extra);

/* ---- Distributed save: every writer (rank) writes its own files with sy_ckpt_write_part(),
 * one coordinator gathers the file lists and calls sy_ckpt_commit(). sy_ckpt_save() is the two
 * in one process. */

/* Writes every group as one F32 safetensors object of checkpoint `step` (no manifest) and
 * returns *files_out, a new JSON array of {"name", "size", "sha256"} for them. SY_EEXIST without
 * writing anything if the step is already committed. On failure some objects may have been
 * written (debris: not a checkpoint until committed). */
sy_status sy_ckpt_write_part(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *groups,
                             int n_groups, json_t **files_out);

/* The same, with every object named "<tag>.<file>" instead of "<file>", and each entry of
 * *files_out carrying that name as "object" (the manifest keeps "name" as the logical file name
 * loaders ask for). Writers of a distributed save tag with sy_ckpt_part_tag(generation, rank),
 * so that a writer of a stale generation only ever writes objects no newer commit lists, and
 * never overwrites an object another writer (or generation) wrote. */
sy_status sy_ckpt_write_part_tagged(sy_store_t *st, const char *run, int64_t step, const char *tag,
                                    const sy_ckpt_group *groups, int n_groups, json_t **files_out);
/* "g<generation>-r<rank>" into buf. */
sy_status sy_ckpt_part_tag(char *buf, size_t cap, uint64_t generation, int rank);

/* Commits checkpoint `step`: checks that every object listed in `files` (an array of
 * {name, size, sha256} as returned by sy_ckpt_write_part, possibly concatenated from several
 * writers; names unique) exists in the store with its size, then writes MANIFEST.json listing
 * exactly these files, with `extra`'s fields merged in (as for sy_ckpt_save), using
 * put_if_absent. SY_EEXIST if the step is already committed (by this or another writer). With a
 * "writer" in extra, the existing commit is judged as by sy_ckpt_prepare_step, the run's lock is
 * checked again just before the manifest is written, and a step committed by another writer
 * between that check and the put is SY_ECONFLICT. Entries may carry "object" (the tagged object
 * that holds the file; names and objects unique); when some do and `extra` has an integer
 * "generation" G, every object must start with "gG-" (SY_EINVAL naming it otherwise): a commit
 * of generation G takes no part of a stale writer. */
sy_status sy_ckpt_commit(sy_store_t *st, const char *run, int64_t step, const json_t *files,
                         const json_t *extra);

/* One step folder of a run: its step and whether it has a MANIFEST.json object (committed;
 * not validated). */
typedef struct {
    int64_t step;
    int committed;
} sy_ckpt_step_info;

/* Every step folder of a run (committed or debris), newest first. *out is malloc'ed (NULL when
 * *n == 0); free() it. */
sy_status sy_ckpt_list(sy_store_t *st, const char *run, sy_ckpt_step_info **out, size_t *n);

/* Fetches file `file` of a manifest's checkpoint, checks its size and SHA-256 against the
 * manifest and that it parses as safetensors. SY_ECORRUPT naming the object on a mismatch,
 * SY_ENOTFOUND if the manifest does not list it or the object is missing. */
sy_status sy_ckpt_verify_file(sy_store_t *st, const json_t *manifest, const char *file);

/* Newest committed checkpoint whose manifest parses, matches run/step and whose files exist
 * with the recorded sizes. Unreadable newer manifests are skipped with a warning; folders
 * without a manifest are ignored. SY_ENOTFOUND if none. */
sy_status sy_ckpt_latest(sy_store_t *st, const char *run, int64_t *step_out);

/* Reads and validates a manifest (*out: new reference). SY_ENOTFOUND if not committed,
 * SY_ECORRUPT if malformed. */
sy_status sy_ckpt_read_manifest(sy_store_t *st, const char *run, int64_t step, json_t **out);

/* Fetches g->file, checks its size and SHA-256 against the manifest (mismatch: SY_ECORRUPT
 * naming the object), and loads every tensor of g by name into its buffer (shapes must match:
 * SY_EFORMAT; missing tensor: SY_ENOTFOUND). Tensors in the file that g does not name are
 * ignored. */
sy_status sy_ckpt_load_group(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *g);
/* Same, with a manifest already read by sy_ckpt_read_manifest (saves re-reading it per file). */
sy_status sy_ckpt_load_group_m(sy_store_t *st, const json_t *manifest, const sy_ckpt_group *g);

/* Every file a manifest lists exists in the store with its recorded size (no checksums:
 * that is sy_ckpt_verify_file). SY_ECORRUPT / SY_ENOTFOUND naming the object. */
sy_status sy_ckpt_check_files(sy_store_t *st, const json_t *manifest);

/* Decides what a save of `step` must do about an existing commit of that step, before writing
 * anything. `extra` is the manifest's extra fields; when it has a string "writer" (ckpt_run.h),
 * the run's lock must name that writer (SY_ECONFLICT otherwise) and an existing manifest is
 * judged: committed by the same writer: SY_EEXIST (keep it); broken (does not parse, or a file
 * is missing or has the wrong size), or committed by another writer (which no longer owns the
 * run, since the lock names this one: a fenced-off writer's late commit): moved aside
 * (MANIFEST.retired.json) with a warning, SY_OK (the caller rewrites the step). Without a
 * writer: SY_EEXIST if committed. SY_OK: not committed, go ahead. */
sy_status sy_ckpt_prepare_step(sy_store_t *st, const char *run, int64_t step, const json_t *extra);

/* Moves the manifest of committed step `step` aside to MANIFEST.retired.json (kept for a
 * post-mortem), so the step is listed as uncommitted and a run reaching it writes it again. */
sy_status sy_ckpt_retire(sy_store_t *st, const char *run, int64_t step, const char *why);

/* Retires every committed step newer than `latest` (-1: all) that is broken (its manifest does
 * not parse, or a file is missing or has the wrong size): what a resume fell back from. A step
 * that cannot be judged (a store error) is an error, never retired on a guess. */
sy_status sy_ckpt_retire_broken(sy_store_t *st, const char *run, int64_t latest);

/* Deletes committed checkpoints older than the newest `keep_last` (≥ 1, so the newest is never
 * deleted; the manifest goes first, so an interrupted deletion leaves debris, never a broken
 * checkpoint), and debris folders older than the newest committed one (newer debris may be a
 * save in progress and is kept). */
sy_status sy_ckpt_retain(sy_store_t *st, const char *run, int keep_last);

#endif
