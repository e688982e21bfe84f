"""Predict every published entry and compare: the tables behind "Predicting published systems".

    python -m moesim.experiments.published fit --write   # fit runtimes on their calibration sets
    python -m moesim.experiments.published predict      # predictions, effects, leave-one-GPU-out
    moesim-sim experiment=published                     # the same predictions into a run folder

``predict`` uses the runtime profiles as shipped (their fitted values included), as a user
would; it never refits. Each row says whether the entry calibrated its runtime (``role``) and,
where it cannot be simulated here, why (``not_predictable``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.hw_profiles import ProfileError
from moesim.hw_profiles.runtime import RuntimeProfile, list_runtimes, load_runtime, runtime_path

from .entries import DATA_DIR, Entry, load_entries
from .fit import CALIBRATION, FitResult, fit_runtime
from .predict import NotPredictable, Prepared, as_metric, predict_s_per_token, prepare

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PREDICTIONS_CSV = RESULTS / "published_predictions.csv"
EFFECTS_CSV = RESULTS / "published_effects.csv"
LOGO_CSV = RESULTS / "published_logo.csv"
FIT_JSON = RESULTS / "published_fit.json"


class Predictions:
    """Predicted values per entry under given runtimes (prepared runs memoised)."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.by_id = {e.id: e for e in entries}
        self._prepared: dict[str, Prepared | NotPredictable] = {}

    def prepared(self, entry: Entry) -> Prepared:
        got = self._prepared.get(entry.id)
        if got is None:
            try:
                if entry.runtime not in CALIBRATION:
                    raise NotPredictable(
                        f"runtime {entry.runtime}: no calibrated profile (no published entry "
                        "calibrates its overheads; a roofline prediction would say nothing)")
                got = prepare(entry)
            except NotPredictable as exc:  # a broken shipped profile is an error, not a row
                got = exc
            self._prepared[entry.id] = got
        if isinstance(got, NotPredictable):
            raise got
        return got

    def value(self, entry: Entry, runtime: RuntimeProfile) -> float:
        """The entry's metric predicted under ``runtime`` (a speed-up: both runs)."""
        s = predict_s_per_token(self.prepared(entry), runtime)
        if entry.metric != "speedup":
            return as_metric(entry, s)
        base = self.by_id[str(entry.baseline)]
        return predict_s_per_token(self.prepared(base), runtime) / s


def fit_all(entries: Sequence[Entry], preds: Predictions | None = None,
            only: Sequence[str] | None = None) -> list[FitResult]:
    """Fit every runtime that declares a calibration set (or those in ``only``). A calibration
    entry that cannot be simulated is an error: a fit on part of its set is no fit."""
    preds = preds or Predictions(entries)
    out = []
    for name in sorted(only or CALIBRATION):
        rt = load_runtime(name)
        try:
            out.append(fit_runtime(rt, entries, preds.value))
        except NotPredictable as exc:
            raise ValueError(f"runtime {name}: a calibration entry cannot be predicted: "
                             f"{exc}") from None
    return out


def write_fit_json(results: Sequence[FitResult]) -> None:
    """Record ``results`` in ``FIT_JSON``, keeping the other runtimes' committed fits (``fit
    --write --only X`` refits X alone); runtimes in name order."""
    old = json.loads(FIT_JSON.read_text()) if FIT_JSON.is_file() else []
    fits = {f["runtime"]: f for f in old}
    for r in results:
        fits[r.runtime] = {"runtime": r.runtime, "values": r.values,
                           "calibration": list(r.calibration), "loss": r.loss}
        if r.structure:  # the declared alternatives, each with its own fit and loss
            fits[r.runtime]["structure"] = r.structure
            fits[r.runtime]["alternatives"] = [
                {"structure": c, "values": v, "loss": loss} for c, v, loss in r.alternatives]
    FIT_JSON.write_text(json.dumps([fits[k] for k in sorted(fits)], indent=1) + "\n")


def write_fitted(result: FitResult) -> None:
    """Set the fitted values in the runtime's YAML (flow-style ``{value: ...}`` lines), with
    ``kind: fitted`` and the calibration set as the source, and its fitted structural
    choices (plain lines such as ``swap: false``)."""
    path = runtime_path(result.runtime)
    text = path.read_text()
    source = f"fitted by moesim.experiments.published.fit on {', '.join(result.calibration)}"
    for key, value in result.values.items():
        line = f"{{value: {value:.6g}, kind: fitted, source: \"{source}\"}}"
        text = _set_leaf(text, path, key, r"\{.*\}", line, "fitted value")
    for key, choice in result.structure.items():
        text = _set_leaf(text, path, key, r"\S+", choice, "fitted choice")
    path.write_text(text)


def _set_leaf(text: str, path: Path, key: str, old: str, new: str, what: str) -> str:
    """``text`` with the value (matching ``old``) of the first ``leaf:`` line after the
    ``section:`` line of ``key`` (``section.leaf``) replaced by ``new``."""
    section, leaf = key.split(".")
    start = re.search(rf"^{re.escape(section)}:\s*$", text, re.M)
    if start is None:
        raise ProfileError(f"{path}: no section {section!r} to write {key} into")
    m = re.compile(rf"^(\s+{re.escape(leaf)}: ){old}$", re.M).search(text, start.end())
    if m is None:
        raise ProfileError(f"{path}: no line for {key} to write the {what} into")
    return text[:m.start()] + m.group(1) + new + text[m.end():]


def _row(entry: Entry, preds: Predictions) -> dict[str, Any]:
    role = "calibration" if entry.id in CALIBRATION.get(entry.runtime, ()) else "held_out"
    row: dict[str, Any] = {
        "id": entry.id, "source": entry.source.id, "model": entry.model, "gpu": entry.gpu,
        "hw": entry.hw, "runtime": entry.runtime,
        # the entry's own structural rules on top of the runtime (what ran, beside its name)
        "runtime_options": ";".join(f"{k}={v}" for k, v in sorted(entry.runtime_options.items())),
        "metric": entry.metric,
        "cache": ",".join(f"{k}={v}" for k, v in entry.cache.items()),
        "prefetch": entry.prefetch, "bits": entry.bits("experts"), "measured": entry.value,
        "predicted": math.nan, "ratio": math.nan, "role": role, "not_predictable": "",
        "routing": "",
    }
    try:
        runtime = load_runtime(entry.runtime)
        row["predicted"] = preds.value(entry, runtime)
        row["ratio"] = row["predicted"] / entry.value
        row["routing"] = preds.prepared(entry).routing  # the trace replayed, as it was
    except NotPredictable as exc:
        row["role"] = "not_predictable"
        row["not_predictable"] = str(exc)
    return row


def predictions_table(entries: Sequence[Entry], preds: Predictions | None = None,
                      progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    preds = preds or Predictions(entries)
    rows = []
    for i, e in enumerate(entries):
        if progress:
            progress(f"[{i + 1}/{len(entries)}] {e.id}")
        rows.append(_row(e, preds))
    return pd.DataFrame(rows)


# Within-system effects of mixtral-offloading's Table 2: (name, numerator, denominator) over
# the id pattern mo_t2_<gpu>_<bits>_<algorithm>; all in tokens/s, so a gain is a ratio.
_GPUS = ("a100", "m3080", "r3060", "t4")
_BITS = ("2bit", "3bit")


def effects_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Cache gain (LRU without pre-loading vs no cache), pre-load gain (full vs without
    pre-loading), and the RTX 3060 / 3080 Mobile ratio, measured vs predicted."""
    by = pred.set_index("id")
    rows = []

    def add(effect: str, setting: str, num: str, den: str) -> None:
        if num not in by.index or den not in by.index:
            return
        m = by.loc[num, "measured"] / by.loc[den, "measured"]
        p = by.loc[num, "predicted"] / by.loc[den, "predicted"]
        roles = {by.loc[num, "role"], by.loc[den, "role"]}
        rows.append({"effect": effect, "setting": setting, "measured": m, "predicted": p,
                     "error": p / m - 1,
                     "role": "calibration" if "calibration" in roles else "held_out"})

    for g in _GPUS:
        for b in _BITS:
            add("cache gain", f"{g} {b}", f"mo_t2_{g}_{b}_nopre", f"mo_t2_{g}_{b}_nocache")
            add("pre-load gain", f"{g} {b}", f"mo_t2_{g}_{b}_full", f"mo_t2_{g}_{b}_nopre")
    for b in _BITS:
        for alg in ("full", "nopre", "nocache"):
            add("RTX 3060 / 3080 Mobile", f"{b} {alg}", f"mo_t2_r3060_{b}_{alg}",
                f"mo_t2_m3080_{b}_{alg}")
    return pd.DataFrame(rows)


def logo_table(entries: Sequence[Entry], runtime: str = "hqq_offload",
               preds: Predictions | None = None) -> pd.DataFrame:
    """Leave one GPU out: fit the runtime on every other GPU's entries, predict this GPU's."""
    preds = preds or Predictions(entries)
    mine = []
    for e in entries:
        if e.runtime != runtime:
            continue
        try:
            preds.prepared(e)
        except NotPredictable:
            continue
        mine.append(e)
    rt = load_runtime(runtime)
    rows = []
    gpus = pd.Series([e.hw for e in mine]).value_counts()
    for hw in sorted(gpus[gpus >= 4].index):  # GPUs with a row of the table, not a lone cell
        cal = tuple(e.id for e in mine if e.hw != hw)
        # a coarser search than the shipped fit (a 3-point full grid, two refinements of 5
        # points): 4 folds of ~18 entries each stay within a few minutes
        res = fit_runtime(rt, mine, preds.value, calibration={runtime: cal}, rounds=2,
                          points=5, coarse=3)
        fitted = _with(rt, res)
        for e in mine:
            if e.hw == hw:
                p = preds.value(e, fitted)
                rows.append({"left_out": hw, "id": e.id, "measured": e.value, "predicted": p,
                             "ratio": p / e.value,
                             **{f"fit.{k}": v for k, v in res.values.items()},
                             **{f"fit.{k}": c for k, c in res.structure.items()}})
    return pd.DataFrame(rows)


def _with(rt: RuntimeProfile, res: FitResult) -> RuntimeProfile:
    from moesim.hw_profiles.runtime import with_structure, with_values

    return with_values(with_structure(rt, res.structure), res.values, "leave-one-GPU-out fit")


def summary(pred: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers: median |ratio - 1| and share within 2x, held-out and calibration."""
    out: dict[str, Any] = {}
    for role in ("held_out", "calibration"):
        r = pred.loc[pred["role"] == role, "ratio"].dropna()
        out[role] = {
            "entries": len(r),
            "median_abs_error": float((r - 1).abs().median()) if len(r) else math.nan,
            "within_2x": float(((r >= 0.5) & (r <= 2)).mean()) if len(r) else math.nan,
        }
    out["not_predictable"] = int((pred["role"] == "not_predictable").sum())
    return out


def run_all(out: Path = RESULTS, progress: Callable[[str], None] | None = None,
            data: Path = DATA_DIR) -> dict[str, Any]:
    """Predictions, effects and the leave-one-GPU-out report into ``out``; returns the summary.
    Every entry is validated before anything is simulated or written."""
    entries = load_entries(data, runtimes=list_runtimes())
    preds = Predictions(entries)
    pred = predictions_table(entries, preds, progress)
    out.mkdir(parents=True, exist_ok=True)
    pred.to_csv(out / PREDICTIONS_CSV.name, index=False, float_format="%.6g")
    effects_table(pred).to_csv(out / EFFECTS_CSV.name, index=False, float_format="%.6g")
    if progress:
        progress("leave-one-GPU-out fits (hqq_offload)")
    logo_table(entries, preds=preds).to_csv(out / LOGO_CSV.name, index=False,
                                            float_format="%.6g")
    return summary(pred)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from .entries import PublishedError

    ap = argparse.ArgumentParser(prog="python -m moesim.experiments.published",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit each runtime on its declared calibration entries")
    f.add_argument("--only", nargs="*", help="fit only these runtimes")
    f.add_argument("--write", action="store_true", help="write the fitted values into the "
                   "runtime YAMLs and published_fit.json")
    p = sub.add_parser("predict", help="predict every entry (runtime YAMLs as shipped)")
    p.add_argument("--out", type=Path, default=RESULTS)
    for q in (f, p):
        q.add_argument("--data", type=Path, default=DATA_DIR, help="folder of source YAMLs")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fit":
            entries = load_entries(args.data, runtimes=list_runtimes())
            results = fit_all(entries, only=args.only)
            for r in results:
                print(f"{r.runtime}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.values.items())
                      + "".join(f", {k}={c}" for k, c in r.structure.items())
                      + f"  (loss {r.loss:.4f} on {len(r.calibration)} entries, "
                      f"{r.evaluations} evaluations)")
                for c, _, loss in r.alternatives[1:]:
                    print("  not kept: " + ", ".join(f"{k}={v}" for k, v in c.items())
                          + f" (loss {loss:.4f})")
            if args.write:
                for r in results:
                    write_fitted(r)
                write_fit_json(results)
            return 0
        s = run_all(args.out, lambda m: print(m, file=sys.stderr), args.data)
        print(json.dumps(s, indent=1))
        return 0
    except (PublishedError, ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
