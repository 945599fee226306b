"""Renders ``docs/benchmarks.md`` from the result files of ``benchmarks/bench.py`` and ``vocab_parallel_gpu.py``.

    python -m benchmarks.report [--bench docs/bench-h200.json] [--sweep docs/bench-h200-sweep.json]
                                [--parallel docs/vocab-parallel-2xh200.json] [--out docs/benchmarks.md]

Every ratio is formed from rows of the same file (the same run); the verdicts compare them with the
targets in ``TARGETS``. With matplotlib installed, the sweep is also plotted (``sweep.png`` beside the
markdown); without it an existing plot is linked as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from collections.abc import Callable

from benchmarks.common import MIB, read_json

WORKLOAD_ORDER = ("gemma2-2b", "llama3-8b")
REGIME_ORDER = ("uniform", "peaked")
REGIME_TEXT = {"uniform": "near-uniform softmax", "peaked": "peaked softmax"}
COMPARE_TOLERANCE = 1.03  # a refactor's headline rows: within 3 % of the tree before it


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measure:
    value: float | None
    detail: str


@dataclasses.dataclass(frozen=True)
class Target:
    """``measure(rows)`` over the rows of one workload and regime (by impl) gives a value that meets the
    target when ``<= limit`` (and the stretch goal when ``<= stretch``)."""

    text: str
    source: str
    measure: Callable[[dict], Measure]
    limit: float
    stretch: float | None = None
    unit: str = "×"
    regimes: tuple = REGIME_ORDER


def _missing(rows: dict, *names: str) -> str | None:
    for name in names:
        row = rows.get(name)
        if row is None:
            return f"no `{name}` row"
        if row.get("skipped"):
            return f"`{name}` skipped"
        if row.get("errors"):
            return f"`{name}` failed"
    return None


def _ratio(impl: str, base: str, key: str) -> Callable[[dict], Measure]:
    def measure(rows):
        why = _missing(rows, impl, base)
        if why or not rows[impl].get(key) or not rows[base].get(key):
            return Measure(None, why or "not timed")
        a, b = rows[impl][key], rows[base][key]
        return Measure(a / b, f"{a:.1f} / {b:.1f} ms")

    return measure


def _fastest_peer(rows: dict) -> dict | None:
    """The fastest forward+backward of a peer with a reduced loss (what training calls)."""
    peers = [r for r in rows.values() if r.get("kind") == "peer" and r.get("reduction") in ("mean", "sum")
             and r.get("fwdbwd_ms") and not r.get("errors") and not r.get("skipped")]
    return min(peers, key=lambda r: r["fwdbwd_ms"]) if peers else None


def _mean_vs_peer(rows):
    why, peer = _missing(rows, "jax-pallas-mean"), _fastest_peer(rows)
    if why or peer is None:
        return Measure(None, why or "no peer with a reduced loss timed")
    a = rows["jax-pallas-mean"]["fwdbwd_ms"]
    return Measure(a / peer["fwdbwd_ms"], f"{a:.1f} / {peer['fwdbwd_ms']:.1f} ms (`{peer['impl']}`)")


def _mean_memory_vs_peer(rows):
    why, peer = _missing(rows, "jax-pallas-mean"), _fastest_peer(rows)
    if why or peer is None or not peer.get("extra_mem_mb"):
        return Measure(None, why or "no peer memory")
    a = rows["jax-pallas-mean"]["extra_mem_mb"]
    return Measure(a / peer["extra_mem_mb"], f"{a:.0f} / {peer['extra_mem_mb']:.0f} MiB (`{peer['impl']}`)")


def _memory_mib(impl: str) -> Callable[[dict], Measure]:
    def measure(rows):
        why = _missing(rows, impl)
        if why:
            return Measure(None, why)
        return Measure(rows[impl]["extra_mem_mb"], f"{rows[impl]['extra_mem_mb']:.0f} MiB")

    return measure


def _exact_memory_mb(rows):
    """MB beyond inputs, gradients and the float32 ``d_hidden`` accumulator (N·D·4 bytes)."""
    why = _missing(rows, "jax-pallas")
    if why:
        return Measure(None, why)
    r = rows["jax-pallas"]
    acc = r["n"] * r["d"] * 4
    return Measure((r["extra_mem_mb"] * MIB - acc) / 1e6, f"{r['extra_mem_mb']:.0f} − {acc / MIB:.0f} MiB accumulator")


TARGETS = (
    Target("exact forward ≤ 1.10× the forward `floor`", "issue 16", _ratio("jax-pallas", "floor", "fwd_ms"), 1.10),
    Target("exact forward+backward ≤ 1.15× `floor` (stretch 1.05×)", "issue 16",
           _ratio("jax-pallas", "floor", "fwdbwd_ms"), 1.15, 1.05),
    Target("exact path: extra memory ≤ 64 MB beyond inputs, gradients and float32 accumulators", "issue 16",
           _exact_memory_mb, 64, unit=" MB"),
    Target("`jax-pallas-mean` forward+backward ≤ 1.0× the fastest peer (stretch 0.9×)", "issue 16", _mean_vs_peer,
           1.0, 0.9),
    Target("`jax-pallas-mean` memory ≤ 1/3 of that peer's", "issue 16", _mean_memory_vs_peer, 1 / 3),
    Target("`jax-pallas-mean` extra memory ≤ 1 GiB", "issue 16", _memory_mib("jax-pallas-mean"), 1024, unit=" MiB"),
    Target("softcap adds ≤ 5 % to the exact forward+backward (`jax-pallas-softcap` / `jax-pallas`)", "issue 15",
           _ratio("jax-pallas-softcap", "jax-pallas", "fwdbwd_ms"), 1.05),
    Target("all options together (bias, softcap, smoothing, z-loss) ≤ 1.05× `jax-pallas`", "issue 15",
           _ratio("jax-pallas-options", "jax-pallas", "fwdbwd_ms"), 1.05),
    Target("forward ≤ 1.0× CCE's forward (stretch 0.85×)", "round one", _ratio("jax-pallas", "cce", "fwd_ms"), 1.0,
           0.85),
    Target("exact forward+backward ≤ 0.6× CCE exact (stretch 0.45×)", "round one",
           _ratio("jax-pallas", "cce-exact", "fwdbwd_ms"), 0.6, 0.45),
    Target("filtered forward+backward ≤ 1.0× CCE's default (near-uniform)", "round one",
           _ratio("jax-pallas-filtered", "cce", "fwdbwd_ms"), 1.0, regimes=("uniform",)),
    Target("torch `impl=\"pallas\"` ≤ 1.05× the JAX op (forward+backward)", "round one",
           _ratio("torch_heads-pallas", "jax-pallas", "fwdbwd_ms"), 1.05),
    Target("torch head ≤ 1.05× a bare CCE call (forward+backward)", "round one",
           _ratio("torch_heads-cce", "cce", "fwdbwd_ms"), 1.05),
)


def _fmt_value(value: float, unit: str) -> str:
    return f"{value:.2f}×" if unit == "×" else f"{value:.0f}{unit}"


def verdict_table(groups: dict) -> list[str]:
    keys = [k for k in groups if k[0] in WORKLOAD_ORDER]
    lines = [
        "| target | from | " + " | ".join(f"{w} {r}" for w, r in keys) + " | verdict |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for t in TARGETS:
        cells, met, missed, stretch = [], [], [], []
        for key in keys:
            if key[1] not in t.regimes:
                cells.append("")
                continue
            m = t.measure(groups[key])
            if m.value is None:
                cells.append(f"not measured ({m.detail})")
                continue
            ok = m.value <= t.limit
            (met if ok else missed).append(key)
            stretch.append(t.stretch is not None and m.value <= t.stretch)
            cells.append(f"**{_fmt_value(m.value, t.unit)}** {'met' if ok else 'missed'}: {m.detail}")
        if missed:
            verdict = "missed at " + ", ".join(f"{w} {r}" for w, r in missed)
        elif met:
            verdict = "met" + ("" if len(met) == len([k for k in keys if k[1] in t.regimes]) else " where measured")
            if t.stretch is not None:
                verdict += f"; stretch met {'everywhere' if all(stretch) else f'in {sum(stretch)} of {len(stretch)}'}"
        else:
            verdict = "not measured"
        lines.append(f"| {t.text} | {t.source} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------


def _f(x, kind="f") -> str:
    if x is None:
        return "-"
    return {"e": f"{x:.2e}", "x": f"{x:.2f}"}.get(kind, f"{x:.1f}")


def group_rows(rows: list[dict]) -> dict:
    """``{(workload, regime): {impl: row}}`` in the benchmark's order, warm-up rows left out."""
    groups: dict = {}
    for r in rows:
        if r.get("kind") != "warmup":
            groups.setdefault((r["workload"], r["regime"]), {})[r["impl"]] = r

    def order(key):
        w, r = key
        return (WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else len(WORKLOAD_ORDER), w,
                REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER))

    return {k: groups[k] for k in sorted(groups, key=order)}


def result_table(rows: dict) -> list[str]:
    floor = rows.get("floor") if not _missing(rows, "floor") else None
    head = ["impl", "reduction", "fwd ms", "fwd+bwd ms"]
    if floor:
        head += ["fwd × floor", "fwd+bwd × floor"]
    head += ["fwd TFLOP/s", "fwd+bwd TFLOP/s", "extra MiB", "err loss", "err dh", "err dw"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for r in rows.values():
        if r.get("skipped"):
            skipped.append(f"- `{r['impl']}` skipped: {r['skipped']}")
            continue
        impl = f"`{r['impl']}`" + (f" (failed: {'; '.join(r['errors'])[:100]})" if r.get("errors") else "")
        cells = [impl, r.get("reduction", "none"), _f(r.get("fwd_ms")), _f(r.get("fwdbwd_ms"))]
        if floor:
            cells += [_f(r["fwd_ms"] / floor["fwd_ms"] if r.get("fwd_ms") else None, "x"),
                      _f(r["fwdbwd_ms"] / floor["fwdbwd_ms"] if r.get("fwdbwd_ms") else None, "x")]
        cells += [_f(r.get("fwd_tflops")), _f(r.get("fwdbwd_tflops")), _f(r.get("extra_mem_mb")),
                  _f(r.get("err_loss"), "e"), _f(r.get("err_dh"), "e"), _f(r.get("err_dw"), "e")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ([""] + skipped if skipped else [])


def sweep_tables(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r.get("kind") != "warmup" and not r.get("skipped")]
    vocabs = sorted({r["v"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(r["impl"], r["v"]): r for r in rows}
    lines = []
    for key, title in (("fwdbwd_ms", "forward+backward ms"), ("extra_mem_mb", "extra MiB")):
        lines += [f"{title}:", "", "| impl | " + " | ".join(f"V = {v:,}".replace(",", " ") for v in vocabs) + " |",
                  "|---|" + "---|" * len(vocabs)]
        for impl in impls:
            lines.append(f"| `{impl}` | " + " | ".join(_f(by.get((impl, v), {}).get(key)) for v in vocabs) + " |")
        lines.append("")
    return lines


def plot_sweep(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r.get("fwdbwd_ms") and r.get("kind") != "warmup"]
    if not rows:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["v"], r["fwdbwd_ms"], r.get("extra_mem_mb") or 0) for r in rows if r["impl"] == impl)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax_m.plot([p[0] for p in pts], [max(p[2], 0.1) for p in pts], marker="o", label=impl)
    n, d = rows[0]["n"], rows[0]["d"]
    ax_t.set(xscale="log", xlabel="vocabulary size", ylabel="forward+backward ms", title=f"time (N={n}, D={d}, bf16)")
    ax_m.set(xscale="log", yscale="log", xlabel="vocabulary size", ylabel="extra MiB", title="extra memory")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def compare_table(compare: dict) -> list[str]:
    """Median over rounds of each tree's headline rows, and this tree's over the other's."""
    times: dict = {}
    for r in compare["rows"]:
        for key in ("fwd_ms", "fwdbwd_ms"):
            if r.get(key):
                per_tree = times.setdefault((r["workload"], r["regime"], r["impl"], key), {})
                per_tree.setdefault(r["tree"], []).append(r[key])
    commits = compare.get("commits", {})
    lines = [
        f"This checkout (`{commits.get('this')}`) against `{compare['tree']}` (`{commits.get('other')}`), each timed "
        f"by this benchmark in its own process, {compare['rounds']} alternating rounds (median over rounds). "
        f"Target: this / other ≤ {COMPARE_TOLERANCE:.2f}.",
        "",
        "| workload | regime | impl | fwd ms this / other | ratio | fwd+bwd ms this / other | ratio | within 3 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k[:3] for k in times})
    for w, r, impl in keys:
        cells, oks = [], []
        for key in ("fwd_ms", "fwdbwd_ms"):
            t = times.get((w, r, impl, key), {})
            if "this" in t and "other" in t:
                a, b = statistics.median(t["this"]), statistics.median(t["other"])
                cells += [f"{a:.2f} / {b:.2f}", f"{a / b:.3f}"]
                oks.append(a / b <= COMPARE_TOLERANCE)
            else:
                cells += ["-", "-"]
        verdict = ("yes" if all(oks) else "**no**") if len(oks) == 2 else "not measured"
        lines.append(f"| {w} | {r} | `{impl}` | " + " | ".join(cells) + f" | {verdict} |")
    if compare.get("errors"):
        lines += ["", "Failures:", "", *[f"- {e[:300]}" for e in compare["errors"]]]
    return lines


# ------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------


def method_text(method: dict) -> list[str]:
    return [
        f"bf16 inputs, {method['ignored_fraction']:.0%} of the labels ignored; reduction none (upstream gradient of "
        "ones) unless the row says `sum` or `mean`. Each time is the median of "
        f"{method['iters']} calls after a compiling call and {method['warmup']} warm-up "
        f"call{'s' if method['warmup'] != 1 else ''}, host clock around a "
        "device-synchronised call for both frameworks (a call slower than "
        f"{method['slow_ms']:.0f} ms, a fallback, is timed {method['slow_iters']} times without warm-up; the exact "
        "fallbacks, whose time does not depend on the data, run in the first regime only). `floor`: the bf16 "
        "products that cannot be avoided, torch matmul into preallocated outputs: N×D·D×V for the forward, the "
        "four products of a recomputing kernel (8·N·D·V) for forward+backward. TFLOP/s on the 2·N·D·V (forward) "
        "and 8·N·D·V (forward+backward) convention whatever the algorithm does. Extra MiB: beyond inputs and "
        "gradients — torch rows the allocator's peak (the `torch_heads-pallas*` rows count torch's allocations "
        "only: their kernels' temporaries are JAX's), JAX rows the compiled program's temporary buffers (for "
        "`jax-pallas` including the float32 `d_hidden` accumulator, N·D·4 bytes). Errors: relative in norm against "
        "a float32 reference (a `mean` row scaled by the number of counted tokens).",
        "",
        "Regimes: *near-uniform* — logits ~ N(0, 1/4); *peaked* — hidden states scaled until the mean top "
        f"probability is about {method['peaked_top_prob']} (the measured value is in each heading).",
    ]


def _part_text(part: dict) -> str:
    what = ", ".join(part["method"].get("workloads") or []) or "the comparison of checkouts"
    return f"{what} on GPU {part.get('CUDA_VISIBLE_DEVICES')}, started {part.get('started_utc')}"


def render(bench: dict, sweep: dict | None, parallel: dict | None, sweep_png: str | None, sources: list[str]) -> str:
    env = bench["env"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [
        "# Benchmarks",
        "",
        f"<!-- Generated by `python -m benchmarks.report` from {', '.join(sources)}: change those (by running the "
        "benchmark) or benchmarks/report.py, not this file. -->",
        "",
        f"One **{env['card']}**, {env['date']}; {versions}"
        + (f"; library at commit `{env['commit']}`" if env.get("commit") else "") + ". Only figures of the same "
        "table (the same run) are compared.",
        "",
    ]
    if env.get("parts"):
        parts = "; ".join(_part_text(part) for part in env["parts"])
        lines += [f"Measured in parts, one process each: {parts}.", ""]
    if env.get("notes"):
        lines += [f"- {note}" for note in env["notes"]] + [""]
    groups = group_rows(bench["rows"])
    lines += ["## Method", "", *method_text(env["method"]), ""]
    if any(key[0] in WORKLOAD_ORDER for key in groups):
        lines += ["## Verdicts", "",
                  "Per workload and regime, the measured ratio (or memory) against each target, all from the same run.",
                  "", *verdict_table(groups), ""]
    if groups:
        lines += ["## Results", ""]
    for (workload, regime), rows in groups.items():
        r0 = next(iter(rows.values()))
        top = r0.get("top_prob")
        top = "" if top is None else f", mean top probability {max(top, 0.001):.3f}".replace(" 0.001", " < 0.001")
        lines += [f"### {workload} (N={r0['n']}, D={r0['d']}, V={r0['v']}), {REGIME_TEXT.get(regime, regime)}{top}", "",
                  *result_table(rows), ""]
    if sweep:
        r0 = sweep["rows"][0]
        lines += ["## Vocabulary sweep", "",
                  f"N = {r0['n']}, D = {r0['d']}, near-uniform; {sweep['env']['card']}, {sweep['env']['date']}"
                  + (f" ({'; '.join(sweep['env']['notes'])})" if sweep["env"].get("notes") else "") + ".", "",
                  *sweep_tables(sweep["rows"])]
        if sweep_png:
            lines += [f"![time and memory against vocabulary size]({sweep_png})", ""]
    if bench.get("compare"):
        lines += ["## Against the checkout before a change", "", *compare_table(bench["compare"]), ""]
    if parallel:
        from benchmarks.vocab_parallel_gpu import markdown as parallel_markdown

        body = parallel_markdown(parallel).splitlines()
        notes = [f"- {note}" for note in parallel["env"].get("notes", [])]
        lines += ["## Two GPUs: vocabulary-parallel", "", *body[2:], "", *notes]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="docs/bench-h200.json")
    p.add_argument("--sweep", default="docs/bench-h200-sweep.json", help="'' for none")
    p.add_argument("--parallel", default="docs/vocab-parallel-2xh200.json", help="'' for none")
    p.add_argument("--out", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    bench = read_json(args.bench)
    sweep = read_json(args.sweep) if args.sweep and os.path.exists(args.sweep) else None
    parallel = read_json(args.parallel) if args.parallel and os.path.exists(args.parallel) else None
    folder = os.path.dirname(os.path.abspath(args.out))
    png = os.path.join(folder, "sweep.png")
    has_png = sweep is not None and (plot_sweep(sweep["rows"], png) or os.path.exists(png))
    sources = [path for path in (args.bench, args.sweep, args.parallel) if path and os.path.exists(path)]
    text = render(bench, sweep, parallel, "sweep.png" if has_png else None, sources)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
