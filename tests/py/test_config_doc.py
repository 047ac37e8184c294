"""docs/configuration.md must be exactly what the config field table generates.

The page is produced by sy_config_doc_markdown() (src/base/config.c), printed by the helper
$SY_BUILD/tests/sy_configdoc (and by `switchyard config doc`). When a field, default, rule or
meaning changes, regenerate the page:

    $BUILD/tests/sy_configdoc > docs/configuration.md
"""
import difflib
import os
import sys

import sytest


def main():
    build = os.environ["SY_BUILD"]
    src = os.environ["SY_SRC"]
    tool = os.path.join(build, "tests", "sy_configdoc")
    page = os.path.join(src, "docs", "configuration.md")
    regen = f"{tool} > {page}"

    out = sytest.run([tool], capture_output=True, timeout=60)
    if out.returncode != 0:
        print(f"FAIL: {tool} exited {out.returncode}: {out.stderr.decode(errors='replace')}")
        return 1
    generated = out.stdout
    if not generated.startswith(b"# switchyard configuration\n"):
        print("FAIL: generated page does not start with its title")
        return 1

    try:
        with open(page, "rb") as f:
            committed = f.read()
    except FileNotFoundError:
        print(f"FAIL: {page} is missing; generate it with:\n    {regen}")
        return 1

    if generated != committed:
        diff = difflib.unified_diff(
            committed.decode(errors="replace").splitlines(),
            generated.decode(errors="replace").splitlines(),
            "docs/configuration.md (committed)", "sy_configdoc (generated)", lineterm="", n=1)
        print("\n".join(list(diff)[:60]))
        print(f"FAIL: docs/configuration.md is out of date with src/base/config.c; regenerate it with:\n"
              f"    {regen}")
        return 1
    print("ok: docs/configuration.md matches the config field table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
