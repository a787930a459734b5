"""``python -m bench [--quick] [--only inbound|outbound|cluster]``: run the inbound, the
outbound and the cluster benchmark, each in a fresh process, write ``bench/results/*.json`` and
``bench/results/RESULTS.md``, and print the tables.

``python -m bench soak [--duration 600] [--rate 200] ...``: the soak (memory over time,
10 minutes by default), run on its own and never as part of the default pair."""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench._common import RESULTS, ROOT

BENCHMARKS = ("inbound", "outbound", "cluster")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from bench import soak

        soak.main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller N (a quick look, not the published numbers)")
    p.add_argument("--only", choices=BENCHMARKS, action="append", help="run only this benchmark (repeatable)")
    args = p.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
        print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        # Results go to the JSON files; the per-benchmark JSON on stdout would only repeat them.
        rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=600).returncode
        if rc != 0:
            failed.append(name)
    print((RESULTS / "RESULTS.md").read_text())
    if failed:
        print(f"benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
