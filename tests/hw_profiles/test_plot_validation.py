"""experiments/plot_validation.py on synthetic validation tables (wide and long layouts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.experiments.plot_validation import errors, main, plot_validation, tidy

POLICIES = ("lru", "belady", "next_layer_all", "oracle_prefetch")


def _wide(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for trace in ("deepseek_v2_lite", "moesim_tiny_moe"):
        for pol in POLICIES:
            for cap in (0.1, 0.3):
                real = rng.uniform(5e-3, 50e-3)
                stall = rng.uniform(0.0, real / 2)
                rows.append({
                    "policy": pol, "capacity": cap, "trace": trace,
                    "sim_time_per_output_token_s": real * rng.uniform(0.8, 1.2),
                    "real_time_per_output_token_s": real,
                    "real_time_per_output_token_s_min": real * 0.95,
                    "real_time_per_output_token_s_max": real * 1.07,
                    "sim_stall_per_output_token_s": stall * rng.uniform(0.7, 1.3),
                    "real_stall_per_output_token_s": stall,
                    "real_stall_per_output_token_s_std": stall * 0.05,
                })
    return pd.DataFrame(rows)


def test_wide_table_plots_and_errors_are_right(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    df = _wide(0)
    df.to_parquet(tmp_path / "validation.parquet")
    assert main([str(tmp_path)]) == 0
    png = tmp_path / "validation_scatter.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    err = errors(tidy(df))
    want = (df["sim_time_per_output_token_s"] - df["real_time_per_output_token_s"]) / df[
        "real_time_per_output_token_s"]
    assert np.allclose(err["time per token error"], want)
    assert f"median |error| {want.abs().median():.1%}" in out
    assert np.allclose(err["time per token real spread"], 0.12)
    t = tidy(df)
    assert np.allclose(t["stall per token|hi"] - t["stall per token|lo"],
                       2 * 0.05 * df["real_stall_per_output_token_s"])


def test_long_table_is_aggregated_over_repeats(tmp_path: Path) -> None:
    rows = []
    for pol in POLICIES[:2]:
        rows.append({"source": "sim", "policy.name": pol, "cache.slots": 8,
                     "trace.name": "t", "time_per_output_token_s": 0.011,
                     "stall_per_output_token_s": 0.002})
        for rep, v in enumerate((0.009, 0.010, 0.013)):
            rows.append({"source": "real", "policy.name": pol, "cache.slots": 8,
                         "trace.name": "t", "repeat": rep, "time_per_output_token_s": v,
                         "stall_per_output_token_s": 0.0})
    folder = tmp_path / "run" / "inner"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "validation.parquet")
    t = tidy(pd.read_parquet(folder / "validation.parquet"))
    assert list(t["policy"]) == ["belady", "lru"]
    assert t["time per token|real"].tolist() == [0.010, 0.010]
    assert t["time per token|lo"].tolist() == [0.009, 0.009]
    assert t["time per token|hi"].tolist() == [0.013, 0.013]
    err = errors(t)
    assert err["time per token error"].tolist() == pytest.approx([0.1, 0.1])
    assert err["stall per token error"].isna().all()  # real stall 0: no relative error
    assert main([str(tmp_path), "--out", str(tmp_path / "fig"), "--log"]) == 0
    assert (tmp_path / "fig" / "validation_scatter.png").is_file()


def test_missing_or_unusable_table_is_a_message(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no validation.parquet" in capsys.readouterr().err
    pd.DataFrame({"policy": ["lru"], "x": [1.0]}).to_parquet(tmp_path / "validation.parquet")
    assert main([str(tmp_path)]) == 2
    assert "no sim_/real_ columns" in capsys.readouterr().err
    with pytest.raises(ValueError, match="policy column"):
        tidy(pd.DataFrame({"sim_time_per_output_token_s": [1.0]}))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_validation(pd.DataFrame({"policy": ["lru"]}), tmp_path)


def test_validate_py_columns_are_read(tmp_path: Path) -> None:
    """The columns experiments/validate.py writes (policy.label tells two oracle points apart)."""
    df = pd.DataFrame({
        "config_id": [0, 1, 2], "trace.name": ["embedded"] * 3,
        "policy.label": ["lru", "oracle_prefetch@pre_attention", "oracle_prefetch@demand"],
        "cache.fraction": [0.1, 0.1, 0.25], "cache.slots": [10, 10, 24],
        "tpot_sim_s": [0.011, 0.009, 0.010], "tpot_real_s": [0.010, 0.010, 0.010],
        "tpot_real_min_s": [0.009, 0.0095, 0.0099], "tpot_real_max_s": [0.012, 0.011, 0.0101],
        "stall_sim_s": [0.004, 0.001, 0.0], "stall_real_s": [0.005, 0.002, 0.0],
        "stall_real_min_s": [0.004, 0.001, 0.0], "stall_real_max_s": [0.006, 0.003, 0.0],
    })
    df.to_parquet(tmp_path / "validation.parquet")
    t = tidy(df)
    assert t["policy"].nunique() == 3 and "capacity" in t and "trace" in t
    err = errors(t)
    assert err["time per token error"].tolist() == pytest.approx([0.1, -0.1, 0.0])
    assert err["stall per token error"].tolist()[:2] == pytest.approx([-0.2, -0.5])
    assert np.isnan(err["stall per token error"].iloc[2])
    assert main([str(tmp_path)]) == 0
