"""moesim-plot on small synthetic run tables (no simulation): which columns take which role, what
is drawn for categorical and numeric axes, units, intervals only over seeds or requests, and
one-line errors for bad options or an unplotted varying factor."""

from __future__ import annotations

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.collections import PolyCollection

from moesim.experiments import plot_style as ps
from moesim.experiments.plot import (
    PlotError,
    aggregate,
    bootstrap_ci,
    choose_spec,
    main,
    make_figure,
    relative_frame,
    t975,
)

POLICIES = ("belady", "lru", "oracle_prefetch", "moe_infinity")


def runs(**factors: tuple) -> pd.DataFrame:
    """One row per combination of ``factors``, with metrics that depend on all of them and the
    derived columns a real summary carries (``cache.slots``, ``policy.eviction``)."""
    names = list(factors)
    rows = []
    for i, combo in enumerate(itertools.product(*factors.values())):
        r = dict(zip(names, combo, strict=True))
        h = (i % 7 + 1) / 10
        r.update({"run_dir": f"run{i}", "hit_rate": h, "hit_rate_incl_late": min(1.0, h + 0.05),
                  "stall_per_output_token_s": 5e-6 * (1 + i), "time_per_output_token_s":
                  2e-5 * (1 + i), "demand_bytes": 2e10 + 1e8 * i,
                  "config_hash": f"h{i}", "moesim.version": "0", "run.wall_s": 0.1 + i})
        r.setdefault("mode", "timed")
        r.setdefault("trace.name", "t")
        r.setdefault("seed", 0)
        if "cache.capacity_fraction" in r:
            r["cache.slots"] = round(r["cache.capacity_fraction"] * 1664)
        if "policy.name" in r:
            r["policy.eviction"] = "lru" if r["policy.name"] != "belady" else "belady"
        rows.append(r)
    return pd.DataFrame(rows)


def write_sweep(df: pd.DataFrame, root) -> None:
    for run_dir, g in df.groupby("run_dir"):
        (root / run_dir).mkdir(parents=True)
        g.drop(columns="run_dir").to_parquet(root / run_dir / "summary.parquet", index=False)


def legend_texts(fig: plt.Figure) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def drawn_lines(fig: plt.Figure) -> list:
    """Data lines of visible panels (not the y = x or grid lines, which have no label)."""
    return [ln for ax in fig.axes if ax.get_visible() for ln in ax.get_lines()
            if not ln.get_label().startswith("_")]


def test_defaults_follow_the_sweep_and_options_override_them():
    df = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.05, 0.1, 0.5),
                 "mode": ("timed", "zero_latency")})
    spec = choose_spec(df)
    assert (spec.x, spec.hue, spec.col, spec.row) == ("cache.capacity_fraction", "policy.name",
                                                      "mode", None)
    assert spec.metrics == ("hit_rate", "stall_per_output_token_s", "time_per_output_token_s")
    spec = choose_spec(df, x="policy.name", hue="cache.capacity_fraction", metrics=["hit_rate"])
    assert (spec.x, spec.hue, spec.col, spec.metrics) == ("policy.name",
                                                          "cache.capacity_fraction", "mode",
                                                          ("hit_rate",))
    fig = make_figure(df, spec)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["LRU", "Belady (oracle)"]
    assert ax.get_ylabel() == "hit rate (%)" and "capacity" in fig.legends[0].get_title().get_text()
    plt.close(fig)


def test_time_metrics_have_no_zero_latency_panel():
    """Facets: one row per metric, one column per --col value; the zero-latency cell of a time
    metric is blank and says why (it is not moved up into another metric's row)."""
    df = runs(**{"policy.name": ("lru",), "cache.capacity_fraction": (0.1, 0.5),
                 "mode": ("timed", "zero_latency")})
    fig = make_figure(df, choose_spec(df, metrics=["hit_rate", "stall_per_output_token_s"]))
    assert fig.axes[0].get_gridspec().get_geometry() == (2, 2)
    assert [ax.get_title() for ax in fig.axes] == ["mode: timed", "mode: zero-latency", "", ""]
    assert [ax.get_ylabel() for ax in fig.axes] == ["hit rate (%)", "",
                                                    "stall per output token (µs)", ""]
    assert [ax.axison for ax in fig.axes] == [True, True, True, False]
    assert "not defined in zero-latency runs" in fig.axes[3].texts[0].get_text()
    plt.close(fig)
    # --row alone: one row per mode, one column per metric, the mode in the right margin
    fig = make_figure(df, choose_spec(df, row="mode", metrics=["hit_rate",
                                                               "stall_per_output_token_s"]))
    assert fig.axes[0].get_gridspec().get_geometry() == (2, 2)
    assert [ax.get_ylabel().split(" (")[0] for ax in fig.axes[:3]] == [
        "hit rate", "stall per output token", "hit rate"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["mode: timed"]
    assert not fig.axes[3].axison
    plt.close(fig)
    # --row and --col: metrics x row values as rows, col values as columns
    two = runs(**{"policy.name": ("lru",), "cache.capacity_fraction": (0.1, 0.5),
                  "mode": ("timed",), "hw.name": ("v100_pcie", "a100_sxm4"),
                  "batch": (1, 4)})
    fig = make_figure(two, choose_spec(two, row="hw.name", col="batch",
                                       metrics=["hit_rate", "demand_bytes"]))
    assert fig.axes[0].get_gridspec().get_geometry() == (4, 2)
    assert [bool(ax.get_ylabel()) for ax in fig.axes] == [True, False] * 4
    plt.close(fig)


def test_categorical_x_is_dodged_points_never_joined():
    df = runs(**{"hw.name": ("v100_pcie", "a100_sxm4", "h100_pcie"), "policy.name": POLICIES})
    spec = choose_spec(df)
    assert (spec.x, spec.hue) == ("hw.name", "policy.name")
    fig = make_figure(df, spec)
    lines = drawn_lines(fig)
    assert lines and all(ln.get_linestyle() == "None" for ln in lines)
    first = fig.axes[0]
    per_series = [ln for ln in first.get_lines() if not ln.get_label().startswith("_")]
    assert len({ln.get_marker() for ln in per_series}) == len(POLICIES)
    assert len({ln.get_color() for ln in per_series}) == len(POLICIES)
    xs = sorted(float(x) for ln in per_series for x in ln.get_xdata())
    assert len(set(xs)) == len(xs) == 3 * len(POLICIES)  # dodged: no point on another
    # baselines first, oracles last
    assert [ln.get_label() for ln in per_series] == ["LRU", "MoE-Infinity", "Belady (oracle)",
                                                     "oracle prefetch"]
    plt.close(fig)


def test_numeric_x_is_lines_with_a_marker_and_dash_per_series_and_log_when_decades():
    df = runs(**{"policy.name": POLICIES, "cache.capacity_fraction": (0.05, 0.1, 0.25, 0.5, 1.0)})
    fig = make_figure(df, choose_spec(df, metrics=["hit_rate"]))
    ax = fig.axes[0]
    lines = drawn_lines(fig)
    assert len(lines) == len(POLICIES) and all(len(ln.get_xdata()) == 5 for ln in lines)
    assert len({ln.get_marker() for ln in lines}) == len(POLICIES)
    assert len({str(ln.get_linestyle()) for ln in lines}) == len(POLICIES)
    assert ax.get_xscale() == "log"
    assert list(lines[0].get_xdata()) == pytest.approx([5, 10, 25, 50, 100])  # percent
    assert ax.get_xlabel() == "cache capacity (% of routed experts, log scale)"
    plt.close(fig)
    batch = runs(**{"policy.name": ("lru",), "batch": (1, 2, 4, 8, 16)})
    fig = make_figure(batch, choose_spec(batch, metrics=["hit_rate"]))
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].xaxis.get_scale() == "log"
    plt.close(fig)


def test_units_are_scaled_per_axis():
    assert ps.unit_scale("time", [5e-6]) == (pytest.approx(1e6), "µs")
    assert ps.unit_scale("bytes", [2e10]) == (pytest.approx(1e-9), "GB")
    assert ps.unit_scale("fraction", [0.3]) == (100.0, "%")
    df = runs(**{"policy.name": ("lru", "belady"), "batch": (1, 2)})
    fig = make_figure(df, choose_spec(df, metrics=["stall_per_output_token_s", "demand_bytes"]))
    assert [ax.get_ylabel() for ax in fig.axes[:2]] == ["stall per output token (µs)",
                                                        "bytes copied on demand (GB)"]
    ys = [y for ln in fig.axes[1].get_lines() for y in ln.get_ydata()]
    assert min(ys) >= 20 and max(ys) < 21  # 2.0e10..2.03e10 B shown as GB
    plt.close(fig)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-9, max_value=9e2), st.sampled_from(["time", "bytes"]))
def test_unit_puts_the_largest_value_between_1_and_1000(value, kind):
    if kind == "bytes":
        value *= 1e12
    scale, _ = ps.unit_scale(kind, [value, value / 7])
    assert value * scale * (1 + 1e-12) >= 1 and value * scale < 1000


def test_interval_only_over_seeds_and_labelled():
    one = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.1, 0.5)})
    fig = make_figure(one, choose_spec(one, metrics=["hit_rate"]))
    assert not any(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)
    assert not any("CI" in t for t in legend_texts(fig))
    plt.close(fig)
    seeds = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.1, 0.5),
                    "seed": (0, 1, 2)})
    spec = choose_spec(seeds, metrics=["hit_rate"])
    assert "seed" not in spec.roles()
    fig = make_figure(seeds, spec)
    assert any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)
    assert "mean, 95% CI over 3 seeds" in legend_texts(fig)
    plt.close(fig)


def test_seed_interval_is_the_t_interval():
    df = runs(**{"policy.name": ("lru",), "batch": (1,), "seed": (0, 1, 2)})
    df["hit_rate"] = [0.1, 0.2, 0.3]
    cell = aggregate(df, choose_spec(df, metrics=["hit_rate"]), "hit_rate").table.iloc[0]
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (cell["mean"], cell["lo"], cell["hi"], cell["n"], cell["ci"]) == (
        pytest.approx(0.2), pytest.approx(0.2 - half), pytest.approx(0.2 + half), 3, "seeds")
    assert t975(2) == 4.303 and abs(t975(200) - 1.972) < 0.002


def test_bootstrap_over_requests_for_per_token_time(tmp_path):
    df = runs(**{"policy.name": ("lru", "belady"), "batch": (1, 2)})
    rng = np.random.default_rng(3)
    per_request = pd.concat([pd.DataFrame({
        "run_dir": r, "request": range(40), "output_tokens": rng.integers(5, 50, 40),
        "time_per_output_token_s": rng.uniform(1e-3, 3e-3, 40)}) for r in df["run_dir"]])
    # The summary's time / output tokens is the requests' token-weighted mean (batch 1).
    weighted = per_request.assign(t=per_request["time_per_output_token_s"]
                                  * per_request["output_tokens"]).groupby("run_dir")
    ratio = weighted["t"].sum() / weighted["output_tokens"].sum()
    df["time_per_output_token_s"] = df["run_dir"].map(ratio)
    spec = choose_spec(df, metrics=["hit_rate", "time_per_output_token_s"])
    fig = make_figure(df, spec, per_request)
    assert "95% bootstrap CI over 40 requests" in legend_texts(fig)
    hit_ax, time_ax = fig.axes[:2]
    assert not hit_ax.collections  # hit rate has no per-request rows: no interval
    assert any(isinstance(c, PolyCollection) for c in time_ax.collections)
    cells = aggregate(df, spec, "time_per_output_token_s", per_request).table
    assert ((cells["lo"] < cells["mean"]) & (cells["mean"] < cells["hi"])).all()
    plt.close(fig)


def test_bootstrap_of_constant_values_is_a_point_and_weights_give_the_ratio_of_totals():
    assert bootstrap_ci(np.full(10, 2.0), np.arange(1.0, 11.0), seed=0) == (2.0, 2.0)
    v, w = np.array([1.0, 3.0]), np.array([3.0, 1.0])
    lo, hi = bootstrap_ci(v, w, seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(3.0)


def test_unplotted_varying_factor_is_refused_by_name():
    df = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.1, 0.5),
                 "hw.name": ("v100_pcie", "h100_pcie"), "trace.name": ("a", "b")})
    df["trace.name"] = np.where(np.arange(len(df)) % 2 == 0, "a", "b")
    df["hw.name"] = np.where(np.arange(len(df)) % 4 < 2, "v100_pcie", "h100_pcie")
    with pytest.raises(PlotError, match=r"not plotted but varying: trace\.name .*--where"):
        choose_spec(df, x="cache.capacity_fraction", hue="policy.name", col="hw.name",
                    row="policy.eviction")
    spec = choose_spec(df, x="cache.capacity_fraction", hue="policy.name", col="hw.name",
                       style="trace.name")
    assert spec.style == "trace.name"
    # cache.slots and policy.eviction vary too, but are determined by the plotted columns
    assert choose_spec(df[df["trace.name"] == "a"], x="cache.capacity_fraction",
                       hue="policy.name", col="hw.name").row is None


def test_cli_bad_options_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    df = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.1, 0.5)})
    write_sweep(df, tmp_path / "sweep")
    before = sorted(p.name for p in (tmp_path / "sweep").rglob("*"))
    cases = ((["--metric", "hit_rat"], "--metric 'hit_rat': not in the table; choose from: "),
             (["--x", "nope"],
              "--x 'nope': no such column; swept: policy.name, cache.capacity_fraction; other "),
             (["--where", "mode=timed,zero_latency", "--where", "policy.name=x"],
              "--where policy.name=x: no run has policy.name in ['x']; values: lru, belady"),
             (["--format", "jpg"], "--format jpg: choose from png, pdf, svg"),
             (["--yscale", "sqrt"], "--yscale 'sqrt'"),
             (["--x", "policy.name", "--hue", "policy.name"], "one column in two roles"))
    for args, needle in cases:
        assert main([str(tmp_path / "sweep"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "sweep"), "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--bogus" in err
    assert sorted(p.name for p in (tmp_path / "sweep").rglob("*")) == before


def test_cli_unusable_out_or_timeline_window_is_one_line_and_writes_nothing(tmp_path, capsys):
    """An --out that cannot be a folder was a traceback after aggregate.parquet had been
    written; a non-positive --timeline-ms drew an empty chart."""
    df = runs(**{"policy.name": ("lru", "belady")})
    write_sweep(df, tmp_path / "sweep")
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "file" / "figs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the folder" in err, err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such run or sweep directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no aggregate.parquet
    run = tmp_path / "sweep" / "run0"
    (run / "timeline.json").write_text('{"traceEvents": []}')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for bad in ("0", "-1", "nan"):
        assert main([str(run), "--timeline-ms", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--timeline-ms" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_writes_the_named_figure(tmp_path, capsys):
    df = runs(**{"policy.name": ("lru", "belady"), "hw.name": ("v100_pcie", "h100_pcie")})
    write_sweep(df, tmp_path / "sweep")
    out = tmp_path / "figs" / "link_figure.pdf"
    assert main([str(tmp_path / "sweep"), "--metric", "hit_rate,run.wall_s", "--out", str(out),
                 "--format", "png,svg"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["link_figure.png", "link_figure.svg"]
    assert len(pd.read_parquet(tmp_path / "sweep" / "aggregate.parquet")) == 4
    assert "x=hw.name, hue=policy.name" in capsys.readouterr().out


def test_level_order_and_names():
    assert ps.level_order("policy.name", ["belady", "lru", "oracle_prefetch", "moe_infinity",
                                          "my_policy"]) == ["lru", "moe_infinity", "belady",
                                                            "oracle_prefetch", "my_policy"]
    assert ps.level_order("label", ["oracle_routed", "fate", "none"]) == ["none", "fate",
                                                                          "oracle_routed"]
    assert ps.level_order("batch", [4, 1, 2]) == [1, 2, 4]
    assert ps.level_name("compute_scale", 10.0) == "x10"
    assert ps.level_name("cache.capacity_fraction", 0.25) == "25%"
    assert ps.policy_label("oracle_prefetch@pre_attention+0") == "oracle prefetch @ pre-attention+0"


def test_relative_to_a_reference_run():
    df = runs(**{"label": ("none", "fate", "oracle_routed"), "compute_scale": (1.0, 10.0),
                 "seed": (0, 1)})
    df["stall_per_output_token_s"] = [4.0, 2.0, 2.0, 1.0, 3.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    spec = choose_spec(df, metrics=["stall_per_output_token_s"], relative="label=none")
    assert spec.relative == ("label", "none") and (spec.x, spec.hue) == ("compute_scale", "label")
    cells = aggregate(relative_frame(df, spec, "stall_per_output_token_s"), spec,
                      "stall_per_output_token_s").table.set_index(["label", "compute_scale"])
    assert cells.loc[("fate", 1.0), "mean"] == pytest.approx(-0.25)  # 3/4 - 1, 1.5/2 - 1
    assert cells.loc[("oracle_routed", 10.0), "mean"] == pytest.approx(-1.0)
    assert "none" not in cells.index.get_level_values("label")
    fig = make_figure(df, spec)
    assert fig.axes[0].get_ylabel() == "stall per output token\nchange vs none (LRU) (%)"
    assert "none (LRU)" not in legend_texts(fig)
    plt.close(fig)
    with pytest.raises(PlotError, match="no run has label=nothing"):
        choose_spec(df, relative="label=nothing")
    with pytest.raises(PlotError, match="KEY one of the plotted columns"):
        choose_spec(df, relative="mode=timed")


def test_a_run_with_a_timeline_draws_the_timeline_under_the_given_name(tmp_path):
    import json

    run = tmp_path / "run"
    write_sweep(runs(**{"policy.name": ("lru",)}).assign(run_dir="run"), tmp_path)
    events = [{"name": "attention L0", "tid": "compute", "ts": 0, "dur": 200},
              {"name": "L0 e3", "tid": "compute", "ts": 1500, "dur": 20},
              {"name": "demand L0 e3", "tid": "host link", "ts": 200, "dur": 1300}]
    (run / "timeline.json").write_text(json.dumps({"traceEvents": events}))
    out = tmp_path / "figs" / "step.png"
    assert main([str(run), "--out", str(out)]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["step.png"]  # no summary figure over it


def test_no_request_interval_when_the_requests_do_not_make_the_plotted_statistic():
    """Batch > 1: a step's time counts for every request in it, so the requests' mean time per
    token is not the summary's time / output tokens; the summary value is drawn, no interval."""
    df = runs(**{"policy.name": ("lru",), "batch": (1, 8)})
    df["time_per_output_token_s"] = [2e-3, 0.5e-3]
    per_request = pd.concat([pd.DataFrame({
        "run_dir": r, "output_tokens": [10, 10, 10], "time_per_output_token_s": [2e-3] * 3})
        for r in df["run_dir"]])
    spec = choose_spec(df, metrics=["time_per_output_token_s"])
    cells = aggregate(df, spec, "time_per_output_token_s", per_request).table
    cells = cells.sort_values("batch")
    assert list(cells["mean"]) == [2e-3, 0.5e-3]
    assert list(cells["ci"]) == ["requests", ""]


def test_timeline_of_a_cpu_placement_has_a_host_cpu_row(tmp_path, monkeypatch):
    """A CPU placement's timeline.json has 'host cpu' events and activation copies: the
    timeline plot raised KeyError on them; now a row and legend entries of their own."""
    import json

    from moesim.experiments import plot

    events = [{"name": "attention L0", "tid": "compute", "ts": 0, "dur": 200},
              {"name": "L0 cpu e3", "tid": "host cpu", "ts": 210, "dur": 500},
              {"name": "activation", "tid": "host link", "ts": 710, "dur": 10},
              {"name": "L0 shared", "tid": "compute", "ts": 200, "dur": 20}]
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps({"traceEvents": events}))
    drawn = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, *a, **k: drawn.append(fig) or [])
    plot.plot_timeline(path, tmp_path / "figs")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["host link", "compute", "host cpu"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "expert on host CPU" in labels and "activation copy" in labels
    assert "low-precision copy" not in labels  # none drawn
    plt.close(drawn[0])


# --- figures for venues: log axes named, display names, facets, no overlapping ticks ---------

def test_a_log_y_axis_says_so_in_its_label():
    df = runs(**{"policy.name": ("lru",), "batch": (1, 2, 4)})
    df["stall_per_output_token_s"] = [1e-6, 1e-4, 1e-2]  # spans 10^4: log y
    fig = make_figure(df, choose_spec(df, metrics=["stall_per_output_token_s"]))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel().endswith("log scale)")
    assert ax.get_xscale() == "linear" and "log" not in ax.get_xlabel()  # 1-4: not a decade
    plt.close(fig)


def test_every_config_key_has_a_display_name():
    """No dotted key or underscore reaches an axis, legend or panel title: every config column
    of a real run's summary is named by the table or by a readable fallback."""
    import moesim

    summary = moesim.simulate(mode="zero_latency", max_requests=1, max_tokens=2)
    from moesim.experiments.plot import factor_columns

    keys = factor_columns(summary)
    assert len(keys) > 20
    for key in [*keys, "placement_params.min_gate", "hw.host_link.pinned.peak_bandwidth_Bps"]:
        label = ps.quantity(key).label
        assert "." not in label and "_" not in label, (key, label)
    assert ps.quantity("placement_params.threshold").label == "gate-weight threshold"
    assert ps.quantity("placement_params.min_gate").label == "placement min gate"


def test_figure_texts_never_show_a_raw_config_key():
    df = runs(**{"placement": ("fetch", "skip_low_weight"),
                 "placement_params.threshold": (0.01, 0.05, 0.1),
                 "hw.name": ("v100_pcie", "a100_sxm4")})
    fig = make_figure(df, choose_spec(df, x="placement_params.threshold", hue="placement",
                                      col="hw.name", metrics=["hit_rate", "demand_bytes"]))
    texts = [t.get_text() for t in fig.findobj(plt.Text)]
    assert texts and not [t for t in texts if "placement_params" in t or "hw.name" in t]
    assert "hardware profile: v100_pcie" in texts or "hardware profile: a100_sxm4" in texts
    assert "skip low-weight experts" in legend_texts(fig)  # placements by display name
    plt.close(fig)


def test_facets_put_metrics_in_rows_and_col_values_in_columns():
    df = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.1, 0.5),
                 "hw.name": ("v100_pcie", "a100_sxm4", "rtx4090", "h100_pcie")})
    metrics = ["hit_rate", "stall_per_output_token_s", "time_per_output_token_s"]
    fig = make_figure(df, choose_spec(df, col="hw.name", metrics=metrics))
    assert fig.axes[0].get_gridspec().get_geometry() == (3, 4)
    for i, ax in enumerate(fig.axes):
        row, col = divmod(i, 4)
        # every panel of a row shows one metric: the same y range, its label on the first
        assert ax.get_ylim() == fig.axes[row * 4].get_ylim()
        assert bool(ax.get_ylabel()) == (col == 0)
        assert bool(ax.get_title()) == (row == 0)
        assert bool(ax.get_xlabel()) == (row == 2)
    assert [fig.axes[r * 4].get_ylabel().split(" (")[0] for r in range(3)] == [
        "hit rate", "stall per output token", "time per output token"]
    plt.close(fig)


def _overlaps(fig: plt.Figure) -> list[str]:
    """Pairs of visible tick labels that overlap, on the drawn figure. Labels turned by 0 or 90
    degrees are compared by their boxes; turned labels (parallel) by their spacing."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for n, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        for axis, is_x in ((ax.xaxis, True), (ax.yaxis, False)):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            boxes = sorted(((t.get_window_extent(renderer), t) for t in labels),
                           key=lambda bt: bt[0].x0 if is_x else bt[0].y0)
            for (a, ta), (b, tb) in itertools.pairwise(boxes):
                angle = ta.get_rotation() % 180
                if angle in (0, 90):
                    if a.overlaps(b):
                        found.append(f"axes {n}: {ta.get_text()!r} / {tb.get_text()!r}")
                else:
                    step = (b.x1 - a.x1) * math.sin(math.radians(angle))
                    if step < ta.get_fontsize() * fig.dpi / 72:
                        found.append(f"axes {n}: {ta.get_text()!r} / {tb.get_text()!r} turned")
    return found


def test_tick_labels_never_overlap():
    # numeric x whose levels sit close together on a linear axis
    close = runs(**{"policy.name": ("lru",), "cache.capacity_fraction": (
        0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.9)})
    # many long category names on x
    hws = tuple(f"a_rather_long_hardware_profile_{i}" for i in range(12))
    cats = runs(**{"policy.name": ("lru", "belady"), "hw.name": hws})
    for df, kw in ((close, {}), (cats, {"x": "hw.name"})):
        fig = make_figure(df, choose_spec(df, metrics=["hit_rate", "demand_bytes"], **kw))
        assert _overlaps(fig) == []
        shown = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
        assert len(shown) >= 3  # thinned or turned, not emptied
        plt.close(fig)


def test_the_overlap_check_sees_overlapping_labels():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks([0, 0.01, 0.02], ["first long label", "second long label", "third"])
    assert _overlaps(fig)
    plt.close(fig)
