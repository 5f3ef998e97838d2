#!/usr/bin/env python3
"""Writes the results of a scripts/bench.sh run into docs/performance.md.

    scripts/perf-doc.py [target/bench/results.json [docs/performance.md]]

Replaces what stands between the `<!-- results:begin -->` and `<!-- results:end -->`
markers with the run's table, dated and named by commit, so the published figures are
always a run's own output and never retyped.
"""
import json
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def cell(v):
    # A pipe inside a cell would split the table's column.
    return str(v).replace("|", "\\|")


def render(res):
    meta = res.get("meta", {})
    m = meta.get("machine", {})
    runs = sorted({k.rsplit("-", 1)[0] if k.endswith(("-direct", "-sluice")) else k
                   for k in res.get("runs", {})})
    targets = res.get("targets", [])
    met = sum(1 for t in targets if t.get("met"))
    out = [f"### Run of `{meta.get('commit', '?')}`, {meta.get('date', 'undated')}", ""]
    out.append(f"Machine: {m.get('cpus', '?')} cores ({m.get('cpu', '?')}), Linux "
               f"{m.get('kernel', '?')}; {m.get('pinning', '')}. Build {meta.get('build_s', '?')} s, "
               f"whole run {meta.get('total_s', '?')} s. Scenarios: {', '.join(runs) or 'none'}. "
               f"Targets met: {met} of {len(targets)}.")
    if meta.get("noisy"):
        out.append(f"Noisy: other work took over 10 % of a core during "
                   f"{', '.join(meta['noisy'])}; read those rows with care.")
    out += ["", "| scenario | metric | direct | through sluice | sluice vs direct | target | |",
            "|---|---|---|---|---|---|---|"]
    for r in res.get("rows", []):
        out.append("| " + " | ".join(cell(x) for x in r) + " |")
    other = meta.get("other_load") or []
    if other:
        out += ["", "Other load while measuring (busy share of sluice's core / of the load core "
                "not used by the benchmark):", "", "| scenario | direct run | sluice run |",
                "|---|---|---|"]
        for r in other:
            out.append("| " + " | ".join(cell(x) for x in r) + " |")
    return "\n".join(out) + "\n"


def main():
    results = sys.argv[1] if len(sys.argv) > 1 else "target/bench/results.json"
    page = sys.argv[2] if len(sys.argv) > 2 else "docs/performance.md"
    res = json.load(open(results))
    if not res.get("rows"):
        print(f"{results} has no result rows: {page} left as it was", file=sys.stderr)
        return
    text = open(page).read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"{page} needs one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    open(page, "w").write(head + BEGIN + "\n" + render(res) + END + tail)
    print(f"results written to {page}")


if __name__ == "__main__":
    main()
