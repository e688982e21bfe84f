"""``moesim-train``: fit one expert predictor as a Hydra app (thin wrapper of ``pipeline.run``).

Writes ``metrics.parquet`` (one row per split part x layer, plus ``all``) and, unless
``predictions.write=false``, ``predictions.parquet`` (``traces.predictions`` schema) into the
run directory, and prints the test-split table with the all-zero predictor's bit scores beside
MoE-Beyond-style bit accuracy and macro-F1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moesim.experiments.paths import register_resolvers, sweep_workers_die_with_parent
from moesim.plugins import PluginError, load_plugins
from moesim.predictors.data import PredictorError
from moesim.predictors.metrics import format_table
from moesim.predictors.pipeline import RunConfig, RunOutput, run
from moesim.traces.errors import TraceError
from moesim.traces.store import atomic_path

CONF_DIR = Path(__file__).parent / "conf"
SHOWN = (
    "rows", "exact_match", "recall@{k}", "precision@{k}", "overprov_acc@{k2}", "top1_acc",
    "top3_acc", "bit_acc", "zero_bit_acc", "macro_f1", "zero_macro_f1",
)


def trace_path(cfg: DictConfig) -> Path:
    """``trace.path``, or the embedded trace (built on first use) for ``embedded``."""
    given = str(cfg.trace.path)
    if given == "embedded":
        from moesim.traces.collect.embedded import ensure_embedded_trace

        limit = cfg.trace.get("limit")
        return ensure_embedded_trace(limit=None if limit is None else int(limit))
    path = Path(given).expanduser()
    if not path.is_file():
        raise PredictorError(f"trace.path: {path} does not exist")
    return path


def _plain(node: DictConfig | None) -> dict:
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def run_config(cfg: DictConfig, outdir: Path) -> RunConfig:
    """Plain run settings from the Hydra config."""
    p = cfg.predictor
    pred = cfg.predictions
    out = None
    if pred.write:
        out = Path(pred.path) if pred.path else outdir / "predictions.parquet"
    return RunConfig(
        trace=trace_path(cfg),
        method=str(p.method),
        feature=str(p.feature) if p.get("feature") else "",
        model=_plain(p.get("model")),
        train=_plain(p.get("train")),
        split=tuple(float(x) for x in cfg.split.fractions),
        split_seed=int(cfg.split.seed),
        eval_parts=tuple(str(x) for x in cfg.eval),
        overprov=tuple(int(x) for x in cfg.overprov),
        predictions=out,
        predict_requests=str(pred.requests),
        width=None if pred.width is None else int(pred.width),
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        retrain=bool(cfg.retrain),
        progress=bool(cfg.progress),
        threads=int(cfg.threads),
    )


def report(out: RunOutput, name: str, part: str = "test") -> str:
    """The printed summary: one table per reported split part."""
    df = out.metrics
    rows = df[df["split"] == part]
    if rows.empty:
        return f"{name}: no {part} rows"
    k = next(int(c.split("@")[1]) for c in df.columns if c.startswith("recall@"))
    keys = [s.format(k=k, k2=2 * k) for s in SHOWN]
    keys = [c for c in keys if c in df.columns]
    cached = " (cached model)" if out.cached else ""
    head = (f"{name}  split={part}  requests={len(out.split[part])}  "
            f"available_at={out.available_at}  train_time={out.train_seconds:.2f} s{cached}")
    note = "bit_acc / macro_f1 are MoE-Beyond-style bit scores; zero_* = predicting nothing"
    return "\n".join([head, format_table(rows.to_dict("records"), keys), note])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    outdir = Path(HydraConfig.get().runtime.output_dir)
    try:
        load_plugins(cfg.get("plugins") or ())  # methods a plugin registers (registry.py)
        out = run(run_config(cfg, outdir))
    except (PredictorError, TraceError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    outdir.mkdir(parents=True, exist_ok=True)
    out.metrics.insert(0, "predictor", str(cfg.predictor.name))
    with atomic_path(outdir / "metrics.parquet") as tmp:
        out.metrics.to_parquet(tmp, index=False)
    for part in cfg.eval:
        if part == "test" or len(cfg.eval) == 1:
            print(report(out, str(cfg.predictor.name), str(part)))
    print(f"  metrics: {outdir / 'metrics.parquet'}")
    if out.predictions is not None:
        print(f"  predictions: {out.predictions} (available_at {out.available_at})")
    test = out.metrics[(out.metrics["split"] == "test") & (out.metrics["layer"] == "all")]
    return float(test["exact_match"].iloc[0]) if len(test) else None


def main() -> None:
    register_resolvers()  # ${moesim.dirname:...} in the run and sweep folder names
    with sweep_workers_die_with_parent():
        _hydra_main()


if __name__ == "__main__":
    main()
