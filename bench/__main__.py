"""`make bench`: run every stage benchmark and write bench/results.json and bench/results.md.

A benchmark module `bench/bench_<name>.py` defines `run(work: Path, quick: bool) -> list[dict]`,
one dict per figure with keys: name, value, unit, peer, peer_value, ratio, goal, note. `ratio`
is always "ours relative to the peer/limit" in the direction stated by `goal` (e.g. ">= 1.5").
A benchmark that fails is reported as failed with its error, never silently left out.

    python -m bench                 # all benchmarks
    python -m bench --only wat,dedup
    python -m bench --quick         # smaller inputs, for a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(HERE)])
                  if m.name.startswith("bench_"))


def render_markdown(results: dict) -> str:
    lines = ["# clipcrawl benchmark results", "",
             f"Machine: {results['machine']}. Run at {results['started']}.", "",
             "| benchmark | figure | ours | peer / limit | peer value | ratio | goal | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["benchmarks"].items():
        if entry.get("error"):
            lines.append(f"| {name} | FAILED | | | | | | {entry['error'].splitlines()[-1][:120]} |")
            continue
        size = " (quick)" if entry.get("quick") else ""
        for fig in entry["figures"]:
            def fmt(v):
                return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
            lines.append("| {b} | {n} | {v} {u} | {p} | {pv} | {r} | {g} | {note} |".format(
                b=name + size, n=fig.get("name"), v=fmt(fig.get("value")), u=fig.get("unit", ""),
                p=fig.get("peer", ""), pv=fmt(fig.get("peer_value")), r=fmt(fig.get("ratio")),
                g=fig.get("goal", ""), note=str(fig.get("note", "")).replace("|", "/")))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmark names (default: all): "
                        + ", ".join(discover()))
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    parser.add_argument("--work", default=str(HERE / "work"), help="scratch folder")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)

    names = args.only.split(",") if args.only else discover()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and args.only else {"benchmarks": {}}
    results.update({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, "
                               f"Python {platform.python_version()}",
                    "quick": args.quick})
    failed = 0
    for name in names:
        print(f"== bench {name}", flush=True)
        t0 = time.time()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            figures = module.run(work / name, args.quick)
            entry = {"figures": figures, "seconds": round(time.time() - t0, 1), "quick": args.quick}
            for fig in figures:
                print(f"   {fig.get('name')}: {fig.get('value')} {fig.get('unit', '')} "
                      f"(ratio {fig.get('ratio')} vs {fig.get('peer')}, goal {fig.get('goal')})", flush=True)
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            failed += 1
            entry = {"error": traceback.format_exc(), "seconds": round(time.time() - t0, 1)}
            print(entry["error"], file=sys.stderr)
        results["benchmarks"][name] = entry
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(render_markdown(results))
    print(f"results: {out} and {out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
