"""The generated blocks and the figure of the docs page "Predicting published systems", from the
committed CSVs of ``python -m moesim.experiments.published predict`` (readme_blocks renders
them; no number on the page is typed by hand)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .fit import BLIND_SOURCES, CALIBRATION, NEAR_CALIBRATION
from .report import EFFECTS_CSV, LOGO_CSV, PREDICTIONS_CSV, summary

FIGURE = Path(__file__).resolve().parents[1] / "figures" / "published_predicted_vs_measured"
TARGET_MEDIAN = 0.25  # held-out median |predicted / published - 1|
TARGET_WITHIN_2X = 0.80
TARGET_EFFECT = 0.15  # cache / pre-load gain and the GPU ratio, relative error


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x * 100:.1f} %"


def _num(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    return f"{x:.3g}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def load_predictions() -> pd.DataFrame:
    return pd.read_csv(PREDICTIONS_CSV)


def _within(g: pd.DataFrame) -> int:
    """How many of ``g``'s entries are predicted within 2x."""
    return int(((g["ratio"] >= 0.5) & (g["ratio"] <= 2)).sum())


def _revised() -> set[str]:
    """Entries revised after their prediction was seen (the audit table's decisions)."""
    audits = audit_rows()
    return set(audits.loc[audits["decision"] == "revised", "id"])


def _blind(pred: pd.DataFrame, revised: set[str]) -> pd.Series:
    """Held-out entries of a blind source (``fit.BLIND_SOURCES``) never revised since."""
    return ((pred["role"] == "held_out") & pred["source"].isin(BLIND_SOURCES)
            & ~pred["id"].isin(revised))


def render_blind(pred: pd.DataFrame) -> str:
    """The blind sources one by one: how many entries, how many distinct setups (distinct
    predictions: cells of one setup at other lengths or builds predict alike), how many share
    their GPU profile, model card and runtime with a calibration entry, and how they land."""
    cal = pred[pred["role"] == "calibration"]
    cal_keys = set(zip(cal["hw"], cal["model"], cal["runtime"], strict=True))
    blind = _blind(pred, _revised())
    lines = ["| source | recorded | entries | distinct predictions | same GPU, model and "
             "runtime as a calibration entry | median \\|error\\| | within 2x |",
             "|---|---|---|---|---|---|---|"]
    for src, when in BLIND_SOURCES.items():
        g = pred[blind & (pred["source"] == src)]
        if g.empty:
            lines.append(f"| `{src}` | {when} | 0 (all revised since) | | | | |")
            continue
        near = sum(k in cal_keys for k in zip(g["hw"], g["model"], g["runtime"], strict=True))
        err = (g["ratio"] - 1).abs()
        lines.append(f"| `{src}` | {when} | {len(g)} | {g['predicted'].round(6).nunique()} "
                     f"| {near} | {_pct(float(err.median()))} | {_within(g)} of {len(g)} |")
    return "\n".join(lines)


def render_summary(pred: pd.DataFrame) -> str:
    s = summary(pred)
    h, c = s["held_out"], s["calibration"]
    eff = pd.read_csv(EFFECTS_CSV)
    rows = [
        "| | entries | median \\|predicted / published - 1\\| | within 2x |",
        "|---|---|---|---|",
        f"| held out (predictions) | {h['entries']} | {_pct(h['median_abs_error'])} "
        f"| {_pct(h['within_2x'])} |",
        f"| calibration (fitted on) | {c['entries']} | {_pct(c['median_abs_error'])} "
        f"| {_pct(c['within_2x'])} |",
    ]
    held_rows = pred[pred["role"] == "held_out"]

    def row(label: str, g: pd.DataFrame) -> str:
        err = (g["ratio"] - 1).abs()
        return (f"| {label} | {len(g)} | {_pct(float(err.median()))} "
                f"| {_pct(_within(g) / len(g))} |")

    # the predictions made blind: no entry revised after its prediction was seen (the audit
    # table below lists the revisions, each with its evidence)
    revised = _revised()
    rows.append(row("held out, never revised after their prediction was seen",
                    held_rows[~held_rows["id"].isin(revised)]))
    # written down before any prediction of them, and the model not changed since they were seen
    rows.append(row("held out, blind: sources written down before any prediction of them "
                    "(`fit.BLIND_SOURCES`), never revised", held_rows[_blind(held_rows, revised)]))
    # the headline without the latest session's blind sources (what they moved, and how)
    session = {src: int(when.split(",")[0].split()[1]) for src, when in BLIND_SOURCES.items()}
    latest = max(session.values())
    new = [src for src, n in session.items() if n == latest]
    rows.append(row(f"held out, without the sources added in session {latest}",
                    held_rows[~held_rows["source"].isin(new)]))
    rows.append(row("held out, without repeats of a calibration setup "
                    "(`fit.NEAR_CALIBRATION`)",
                    held_rows[~held_rows["id"].isin(NEAR_CALIBRATION)]))
    for rt, g in held_rows.groupby("runtime"):  # where the error comes from
        rows.append(row(f"held out, runtime {rt}", g))
    rows += [
        "",
        f"{len(pred)} entries from {pred['source'].nunique()} sources; "
        f"{s['not_predictable']} cannot be simulated here yet (reasons below). Calibration "
        "sets, declared in `moesim.experiments.published.fit.CALIBRATION`: "
        + "; ".join(f"{rt}: {len(ids)} entries" for rt, ids in sorted(CALIBRATION.items()))
        + ".",
        "",
        "| target (held-out entries) | measured | |",
        "|---|---|---|",
        f"| median \\|error\\| <= 25 % | {_pct(h['median_abs_error'])} "
        f"| {_met(h['median_abs_error'] <= TARGET_MEDIAN)} |",
        f"| >= 80 % within 2x | {_pct(h['within_2x'])} ({_within(held_rows)} of "
        f"{len(held_rows)}; the target needs {math.ceil(TARGET_WITHIN_2X * len(held_rows))}) "
        f"| {_met(h['within_2x'] >= TARGET_WITHIN_2X)} |",
    ]
    held = eff[eff["role"] == "held_out"]
    for effect, need in (("cache gain", 6), ("pre-load gain", 6)):
        sub = eff[eff["effect"] == effect]
        ok = int((sub["error"].abs() <= TARGET_EFFECT).sum())
        rows.append(f"| {effect} within 15 % in >= {need} of 8 settings | {ok} of {len(sub)} "
                    f"| {_met(ok >= need)} |")
    ratio = held[held["effect"] == "RTX 3060 / 3080 Mobile"]
    worst = float(ratio["error"].abs().max()) if len(ratio) else float("nan")
    rows.append(f"| RTX 3060 / 3080 Mobile ratio within 15 % | worst {_pct(worst)} "
                f"| {_met(worst <= TARGET_EFFECT)} |")
    return "\n".join(rows)


COMPLETED = "completed to top-"  # in the routing column: replayed on a completed trace


def render_table(pred: pd.DataFrame) -> str:
    """One row per predictable entry, grouped by source; a mark on entries replayed on a trace
    completed to the model's top-k (``predict.routing_independent``)."""
    ok = pred[pred["role"] != "not_predictable"]
    completed = ok["routing"].fillna("").str.contains(COMPLETED, regex=False)
    lines = ["Entries marked (c) are replayed on their model's trace completed to its native "
             "top-k (routing-independent entries; the CSV's `routing` column names the trace).",
             ""] if completed.any() else []
    for src, g in ok.groupby("source", sort=True):
        lines += [f"**{src}**", "",
                  "| entry | GPU (profile) | runtime | metric | published | predicted | ratio "
                  "| role |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in g.itertuples():
            opts = r.runtime_options  # NaN where the entry has none (an empty CSV cell)
            runtime = f"{r.runtime} ({opts})" if isinstance(opts, str) else r.runtime
            mark = " (c)" if COMPLETED in str(r.routing) else ""
            lines.append(f"| `{r.id}`{mark} | {r.hw} | {runtime} | {r.metric} "
                         f"| {_num(r.measured)} "
                         f"| {_num(r.predicted)} | {r.ratio:.2f} | {r.role.replace('_', ' ')} |")
        lines.append("")
    return "\n".join(lines)


def render_not_predictable(pred: pd.DataFrame) -> str:
    bad = pred[pred["role"] == "not_predictable"]
    counts = bad.groupby("not_predictable").size().sort_values(ascending=False)
    lines = ["| why an entry is not predicted yet | entries |", "|---|---|"]
    lines += [f"| {why} | {n} |" for why, n in counts.items()]
    return "\n".join(lines)


AUDIT_MARKS = ("Revised in session", "Audited in session")


def _first_sentence(text: str) -> str:
    """The audit's own opening sentence (what prompted it), not its whole evidence."""
    text = " ".join(text.split())
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " ") and i > 20:
            return text[: i + 1]
    return text


def audit_rows() -> pd.DataFrame:
    """Entries an audit looked at after their predictions were seen (an assumption whose reason
    starts with "Revised in session N" or "Audited in session N"), with the decision: a
    revision is listed so that no entry leaves the held-out set unseen."""
    from moesim.hw_profiles.runtime import list_runtimes

    from .entries import load_entries

    pred = load_predictions().set_index("id")
    rows = []
    for e in load_entries(runtimes=list_runtimes()):
        for a in e.assumptions:
            why = " ".join(str(a.why).split())
            if not why.startswith(AUDIT_MARKS) or (a.entries and e.id not in a.entries):
                continue
            role = pred["role"].get(e.id, "")
            rows.append({"id": e.id, "source": e.source.id, "field": a.field,
                         "decision": "revised" if why.startswith("Revised") else "kept",
                         "value": str(a.value), "role": role,
                         "reason": _first_sentence(why)})
    return pd.DataFrame(rows, columns=["id", "source", "field", "decision", "value", "role",
                                       "reason"])


def render_audit(df: pd.DataFrame) -> str:
    """One row per audit (an assumption naming its entries; a file-wide check is one row)."""
    lines = ["| entries (role now) | field | decision | why it was audited |",
             "|---|---|---|---|"]
    keys = ["field", "decision", "value", "reason"]
    for (field, decision, value, reason), g in df.groupby(keys, sort=False):
        ids = ", ".join(f"`{r.id}` ({r.role.replace('_', ' ') or '-'})"
                        for r in g.sort_values("id").itertuples())
        lines.append(f"| {ids} | {field} | {decision}: {value} | {reason} |")
    revised = df[df["decision"] == "revised"]["id"].nunique()
    kept = df[df["decision"] == "kept"]["id"].nunique()
    lines += ["", f"{revised} entries were revised and {kept} audited and kept after their "
              "predictions were seen; every revision quotes its evidence in the entry's "
              "assumptions. A revised entry that became not predictable no longer counts in "
              "the held-out statistics above: what those statistics gain from that is a "
              "smaller set, not a better prediction."]
    return "\n".join(lines)


def render_effects(eff: pd.DataFrame) -> str:
    lines = ["| effect | setting | published | predicted | error | role |",
             "|---|---|---|---|---|---|"]
    for r in eff.itertuples():
        lines.append(f"| {r.effect} | {r.setting} | {r.measured:.3f} | {r.predicted:.3f} "
                     f"| {r.error * 100:+.1f} % | {r.role.replace('_', ' ')} |")
    return "\n".join(lines)


# Fiddler's own cost constants (github.com/efeslab/fiddler src/fiddler/mixtral.py @ 227715bf):
# `latency_cpu = 7` per token for an expert on the CPU, `latency_gpu = 70` for one not resident
# on the GPU; the expert runs on the CPU while tokens x 7 < 70, i.e. below 10 tokens.
FIDDLER_LATENCY_CPU = 7
FIDDLER_LATENCY_GPU = 70
# Fiddler's two environments as profiled here (README: Quadro RTX 6000 + 48-core Skylake,
# L4 + 32-core Cascade Lake), unquantised Mixtral-8x7B (bf16) as Fiddler runs it.
CROSSOVER_SETUPS = ("quadro_rtx6000", "l4")
CROSSOVER_EFFECT = "CPU/fetch crossover (tokens per expert)"


def crossover_effects() -> pd.DataFrame:
    """The CPU/fetch crossover (``sim.hardware.cpu_crossover_tokens``, idle queues) on
    Fiddler's setups, with the host's plain roofline and under the ``fiddler`` runtime's CPU
    kernels (PyTorch bf16 per the host's ISA), against Fiddler's constants. Computed from the
    shipped profiles (no run); nothing in it is fitted."""
    from moesim.hw_profiles import load_profile
    from moesim.hw_profiles.runtime import apply_runtime_cpu, load_runtime
    from moesim.sim.hardware import cpu_crossover_tokens, host_side
    from moesim.traces.model_card import load_card

    card = load_card("mixtral_8x7b")
    published = math.ceil(FIDDLER_LATENCY_GPU / FIDDLER_LATENCY_CPU)
    rows = []
    for hw in CROSSOVER_SETUPS:
        prof = load_profile(hw)
        link, comp = prof.expert_link(), prof.compute_model(card)
        for rt in ("none", "fiddler"):
            host = apply_runtime_cpu(load_runtime(rt), host_side(prof, card))
            n = cpu_crossover_tokens(link, comp, host.cpu, card.expert_bytes,
                                     host.activation_bytes)
            pred = math.nan if n is None else float(n)
            what = "roofline host" if rt == "none" else "fiddler CPU kernels"
            rows.append({"effect": CROSSOVER_EFFECT, "setting": f"{hw}, {what}",
                         "measured": float(published), "predicted": pred,
                         "error": pred / published - 1, "role": "not_fitted"})
    return pd.DataFrame(rows)


def _effects() -> pd.DataFrame:
    return pd.concat([pd.read_csv(EFFECTS_CSV), crossover_effects()], ignore_index=True)


def _fit_value(v: object) -> str:
    """A fitted value as the YAML says it: a number, or a structural choice (pandas reads
    ``false`` back as a bool)."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    return _num(float(v)) if isinstance(v, (int, float, np.number)) else str(v)


def render_logo(logo: pd.DataFrame) -> str:
    lines = ["| GPU left out | entries | median ratio | min | max | fitted on the others |",
             "|---|---|---|---|---|---|"]
    fit_cols = [c for c in logo.columns if c.startswith("fit.")]
    for hw, g in logo.groupby("left_out", sort=True):
        fitted = ", ".join(f"{c[4:]} = {_fit_value(g[c].iloc[0])}" for c in fit_cols)
        lines.append(f"| {hw} | {len(g)} | {g['ratio'].median():.2f} | {g['ratio'].min():.2f} "
                     f"| {g['ratio'].max():.2f} | {fitted} |")
    return "\n".join(lines)


def structure_rows() -> pd.DataFrame:
    """Every declared structural alternative of the committed fits: its fitted values and its
    calibration loss, the kept one first (``published_fit.json``)."""
    import json

    from .report import FIT_JSON

    rows = []
    for f in json.loads(FIT_JSON.read_text()):
        for i, alt in enumerate(f.get("alternatives", [])):
            rows.append({"runtime": f["runtime"],
                         "choice": ", ".join(f"{k}: {v}" for k, v in alt["structure"].items()),
                         "values": ", ".join(f"{k} = {_num(v)}"
                                             for k, v in alt["values"].items()),
                         "loss": alt["loss"], "kept": i == 0,
                         "entries": len(f["calibration"])})
    return pd.DataFrame(rows)


def render_structures(df: pd.DataFrame) -> str:
    lines = ["| runtime | structure | fitted values | calibration loss | |",
             "|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.runtime} | {r.choice} | {r.values} | {r.loss:.4f} "
                     f"({r.entries} entries) | {'kept' if r.kept else 'not kept'} |")
    return "\n".join(lines) + ("\n\nThe loss is the sum over the calibration entries of the "
                               "squared log of predicted / published.")


def figure(pred: pd.DataFrame) -> None:
    """Log-log predicted vs published (y = x, +-25 % band), calibration, held-out and blind
    held-out entries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.experiments.plot_style import STYLE, savefig

    ok = pred[pred["role"] != "not_predictable"].copy()
    # compare like with like: everything as seconds per token
    sec = np.where(ok["metric"] == "tokens_per_s", 1.0 / ok["measured"], ok["measured"])
    psec = np.where(ok["metric"] == "tokens_per_s", 1.0 / ok["predicted"], ok["predicted"])
    ok["published_s"], ok["predicted_s"] = sec, psec
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
        lo = float(min(ok["published_s"].min(), ok["predicted_s"].min())) / 1.5
        hi = float(max(ok["published_s"].max(), ok["predicted_s"].max())) * 1.5
        xs = np.geomspace(lo, hi, 50)
        ax.fill_between(xs, xs / 1.25, xs * 1.25, color="0.85", label="±25 %")
        ax.plot(xs, xs, color="0.3", lw=1, label="y = x")
        # blind: held out, its source written down before any prediction, never revised
        ok.loc[_blind(ok, _revised()), "role"] = "held_out_blind"
        markers = {"calibration": ("s", "#0072B2", "calibration"),
                   "held_out": ("o", "#D55E00", "held out"),
                   "held_out_blind": ("D", "#009E73", "held out, blind")}
        for role, (m, colour, label) in markers.items():
            g = ok[ok["role"] == role]
            ax.scatter(g["published_s"], g["predicted_s"], marker=m, s=28, color=colour,
                       edgecolor="black", linewidth=0.4, label=f"{label} ({len(g)})", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("published time per output token (s, log scale)")
        ax.set_ylabel("moesim's prediction (s, log scale)")
        ax.legend(loc="upper left", fontsize=8)
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        savefig(fig, FIGURE.with_suffix(".png"))
        # no creation date: the same results give the same file
        savefig(fig, FIGURE.with_suffix(".pdf"), metadata={"CreationDate": None})
        plt.close(fig)


def _findings() -> pd.DataFrame:
    from .findings import CSV

    return pd.read_csv(CSV)


def _render_findings(df: pd.DataFrame) -> str:
    from .findings import render, summary

    return ("From `experiments/docs/results/published_findings.csv` "
            "(`python -m moesim.experiments.published.findings`): time per output token, "
            "Mixtral-8x7B with 2-bit experts and 4 experts per layer.\n\n" + render(df)
            + "\n\n" + summary(df))


BLOCKS = {
    "published_findings": (_findings, _render_findings, None),
    "published_summary": (load_predictions, render_summary, figure),
    "published_blind": (load_predictions, render_blind, None),
    "published_table": (load_predictions, render_table, None),
    "published_not_predictable": (load_predictions, render_not_predictable, None),
    "published_audit": (audit_rows, render_audit, None),
    "published_effects": (_effects, render_effects, None),
    "published_logo": (lambda: pd.read_csv(LOGO_CSV), render_logo, None),
    "published_structures": (structure_rows, render_structures, None),
}
