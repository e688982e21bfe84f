"""The importers of the 2025-26 real traces: ``bmoe-route-csv`` (BigMoeOnEdge, llama.cpp-based
expert streaming on a phone) and ``ocs-routing-json`` (moe_ocs_learning, MLX / vLLM-Metal).

Small sources are written here (with a tiny card of their own); the real files are imported by
``tests/traces/test_modern_shared.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moesim.traces import TraceError, import_trace, load_trace
from moesim.traces.store import load_features, read_meta, validate_trace
from moesim.traces.trace import DECODE, PREFILL
from tests.traces.test_fuzz_importers import _mutate, mutations

CARD = """name: tiny_moe_test
hidden_size: 8
moe_intermediate_size: 4
num_experts: 6
top_k: {k}
num_layers: 3
moe_layers: {{first: 0, step: 1}}
experts_bits: 4.5
sources: ["test fixture"]
"""
LAYER_BYTES = (27, 27, 36)


def write_card(folder: Path, k: int = 3) -> Path:
    path = folder / "tiny_moe_test.yaml"
    path.write_text(CARD.format(k=k))
    return path


def bmoe_rows(prefill: int = 3, decode: int = 2, k: int = 2, seed: int = 0):
    """Rows of a valid route trace: 3 layers, 6 experts; the last layer only for the last prompt
    token, as llama.cpp writes it. Residency/bytes follow an unbounded cache."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    rows = []
    for step in range(prefill + decode):
        phase = 0 if step < prefill else 1
        for layer in range(3):
            if phase == 0 and layer == 2 and step < prefill - 1:
                continue
            ids = rng.choice(6, size=k, replace=False)
            w = np.sort(rng.random(k))[::-1]
            w = w / w.sum()
            for slot, (e, wt) in enumerate(zip(ids, w, strict=True)):
                hit = (layer, int(e)) in seen
                seen.add((layer, int(e)))
                res = int(hit) if phase == 1 else 0
                rows.append((0, phase, step, layer, slot, int(e), float(wt), res,
                             0 if hit else LAYER_BYTES[layer]))
    return rows


def write_bmoe(path: Path, rows=None, k: int = 2, preamble: str | None = None) -> Path:
    rows = bmoe_rows(k=k) if rows is None else rows
    head = preamble if preamble is not None else (
        "# route_trace v1\n"
        f"# model=/x/tiny.gguf arch=tiny n_layer=3 n_expert=6 n_expert_used={k}\n"
        + "".join(f"# layer={i} expert_bytes={b} dense_bytes=100\n"
                  for i, b in enumerate(LAYER_BYTES)))
    body = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n" + "".join(
        ",".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in r) + "\n" for r in rows)
    path.write_text(head + body)
    return path


def test_bmoe_import_keeps_phases_ranks_holes_and_the_engines_columns(tmp_path: Path) -> None:
    card = write_card(tmp_path)
    rows = bmoe_rows()
    src = write_bmoe(tmp_path / "t.route.csv", rows[::-1])  # row order must not matter
    res = import_trace("bmoe-route-csv", src, tmp_path / "t.parquet", card=str(card))
    tr = load_trace(res.out)
    meta = tr.meta
    assert meta.top_k == 2 and meta.notes["top_k_reduced_from"] == "3"
    assert meta.partial and meta.notes["missing_cells"].startswith("2 ")  # prefill steps 0, 1
    assert meta.notes["expert_bytes_per_layer"] == "27,27,36"
    req = tr.requests[0]
    assert req.phase.tolist() == [PREFILL] * 3 + [DECODE] * 2
    assert (req.experts[:2, 2] == -1).all() and (req.experts[2:, 2] >= 0).all()
    for r in rows:  # each row lands at (step, layer, slot), weights as given
        assert req.experts[r[2], r[3], r[4]] == r[5]
        assert req.scores[r[2], r[3], r[4]] == pytest.approx(r[6], rel=1e-5)
    assert (np.diff(req.scores[req.experts >= 0].reshape(-1, 2), axis=1) <= 0).all()
    res_col = load_features(res.out, "residency")
    read = load_features(res.out, "read_bytes")
    assert res_col.shape == read.shape == (res.rows, 2)
    by_key = {(r[2], r[3], r[4]): (r[7], r[8]) for r in rows}
    t_idx, j_idx = np.nonzero(req.experts[:, :, 0] >= 0)  # file row order
    for i, (t, j) in enumerate(zip(t_idx, j_idx, strict=True)):
        for s in range(2):
            assert (res_col[i, s], read[i, s]) == by_key[(t, j, s)]
    validate_trace(res.out)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda rows: [*rows, rows[0]], "slot"),  # a duplicated row
    (lambda rows: [r for r in rows if not (r[1] == 1 and r[3] == 1)], "layer"),  # decode hole
    (lambda rows: [(*r[:5], 9, *r[6:]) if i == 4 else r for i, r in enumerate(rows)], "expert"),
    (lambda rows: [(*r[:8], 5) if r[8] else r for r in rows], "expert_bytes"),
    (lambda rows: [(*r[:1], 3, *r[2:]) if i == 0 else r for i, r in enumerate(rows)], "phase"),
    (lambda rows: [(*r[:6], -1.0, *r[7:]) if i == 1 else r for i, r in enumerate(rows)],
     "weight"),
    (lambda rows: rows[:-1], "slot"),  # a cell one slot short
])
def test_bmoe_bad_rows_are_one_error_and_no_file(tmp_path: Path, mutate, field) -> None:
    card = write_card(tmp_path)
    src = write_bmoe(tmp_path / "t.route.csv", mutate(bmoe_rows()))
    out = tmp_path / "out" / "t.parquet"
    with pytest.raises(TraceError) as err:
        import_trace("bmoe-route-csv", src, out, card=str(card))
    assert err.value.field == field, str(err.value)
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize("preamble", [
    "",  # no preamble at all
    "# route_trace v1\n# model=x arch=tiny n_layer=4 n_expert=6 n_expert_used=2\n",  # layers
    "# route_trace v1\n# model=x arch=tiny n_layer=3 n_expert=6 n_expert_used=5\n",  # k > top_k
    "# route_trace v2\n",
    "# route_trace v1\n# model=x arch=tiny n_layer=3 n_expert=6 n_expert_used=2\n# layer=0\n",
])
def test_bmoe_bad_preamble(tmp_path: Path, preamble: str) -> None:
    card = write_card(tmp_path)
    src = write_bmoe(tmp_path / "t.route.csv", preamble=preamble)
    with pytest.raises(TraceError):
        import_trace("bmoe-route-csv", src, tmp_path / "t.parquet", card=str(card))
    assert not (tmp_path / "t.parquet").exists()


def test_bmoe_unknown_arch_names_the_cards(tmp_path: Path) -> None:
    src = write_bmoe(tmp_path / "t.route.csv")
    with pytest.raises(TraceError, match="arch 'tiny' has no card"):
        import_trace("bmoe-route-csv", src, tmp_path / "t.parquet")


def test_cli_bad_input_is_one_error_line_exit_2(tmp_path: Path) -> None:
    src = write_bmoe(tmp_path / "t.route.csv", [*bmoe_rows(), bmoe_rows()[0]])
    out = tmp_path / "t.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "moesim.traces.cli", "import", "--format", "bmoe-route-csv",
         str(src), str(out), "-o", f"card={write_card(tmp_path)}"],
        capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "slot" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# ocs-routing-json


def ocs_capture(prefill: int = 3, decode: int = 2, k: int = 3, ascending: bool = False,
                renorm: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    routes = []
    for t in range(prefill + decode):
        layers = {}
        for j in range(3):
            ids = rng.choice(6, size=k, replace=False).tolist()
            w = sorted(rng.random(k).tolist(), reverse=True)
            s = sum(w) if renorm else sum(w) * 3
            w = [x / s for x in w]
            if ascending:
                ids, w = ids[::-1], w[::-1]
            layers[str(j)] = {"experts": ids, "weights": w}
        routes.append({"token_pos": t, "token_id": 100 + t, "token_str": f"tok{t}",
                       "phase": "prefill" if t < prefill else "decode", "layers": layers})
    meta = {"num_experts": 6, "top_k": k, "num_moe_layers": 3, "backend": "mlx"}
    return {"meta": meta, "prompt_tokens": [], "generated_tokens": [], "routes": routes}


def test_ocs_folder_sorts_ascending_cells_and_notes_raw_weights(tmp_path: Path) -> None:
    card = write_card(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    a, b = ocs_capture(ascending=True, renorm=False, seed=1), ocs_capture(seed=2)
    (src / "a.routing.json").write_text(json.dumps(a))
    (src / "b.routing.json").write_text(json.dumps(b))
    (src / "manifest.json").write_text(json.dumps({"experiments": []}))  # skipped
    res = import_trace("ocs-routing-json", src, tmp_path / "t.parquet", card=str(card))
    tr = load_trace(res.out)
    assert [r.label for r in tr.requests] == ["a.routing.json", "b.routing.json"]
    ra = tr.requests[0]
    cell = a["routes"][0]["layers"]["1"]
    assert ra.experts[0, 1].tolist() == cell["experts"][::-1]  # listed ascending -> rank order
    assert (np.diff(ra.scores, axis=2) <= 0).all()
    assert ra.phase.tolist() == [PREFILL] * 3 + [DECODE] * 2
    assert ra.tokens == [f"tok{t}" for t in range(5)]
    assert "not renormalised" in tr.meta.notes["scores"]
    assert tr.meta.notes["expert_order"].startswith("sorted by weight, descending (15 of 30")
    ids = load_features(res.out, "token_id")
    assert ids[:3, 0].tolist() == [100] * 3  # one row per layer of token 0
    one = import_trace("ocs-routing-json", src / "b.routing.json", tmp_path / "b.parquet",
                       card=str(card))
    assert "approximately renormalised" in read_meta(one.out).notes["scores"]


@pytest.mark.parametrize(("edit", "field"), [
    (lambda c: c["routes"][1].update(token_pos=5), "token_pos"),
    (lambda c: c["routes"][1].update(phase="gen"), "phase"),
    (lambda c: c["routes"][4].update(phase="prefill"), "phase"),
    (lambda c: c["routes"][0]["layers"]["2"].update(experts=[1, 1, 2]), "experts"),
    (lambda c: c["routes"][0]["layers"]["2"].update(experts=[1, 2, 6]), "experts"),
    (lambda c: c["routes"][0]["layers"]["2"].update(weights=[0.5, 0.5]), "experts"),
    (lambda c: c["routes"][0]["layers"].pop("1"), "layers"),
    (lambda c: c["meta"].update(top_k=2), "meta"),
    (lambda c: c.pop("routes"), "routes"),
])
def test_ocs_bad_input_is_one_error_and_no_file(tmp_path: Path, edit, field) -> None:
    card = write_card(tmp_path)
    cap = ocs_capture()
    edit(cap)
    src = tmp_path / "c.json"
    src.write_text(json.dumps(cap))
    out = tmp_path / "t.parquet"
    with pytest.raises(TraceError) as err:
        import_trace("ocs-routing-json", src, out, card=str(card))
    assert err.value.field == field, str(err.value)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# fuzzing, as tests/traces/test_fuzz_importers.py does for the older formats

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(fmt=st.sampled_from(["bmoe-route-csv", "ocs-routing-json"]), mutation=mutations)
def test_a_mutated_source_is_a_trace_error_or_a_valid_trace(fmt: str, mutation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        card = write_card(folder, k=3)
        if fmt == "bmoe-route-csv":
            src = write_bmoe(folder / "t.route.csv")
        else:
            src = folder / "c.json"
            src.write_text(json.dumps(ocs_capture(), indent=1))
        src.write_text(_mutate(src.read_text(encoding="utf-8"), mutation), encoding="utf-8")
        out = folder / "out.parquet"
        try:
            import_trace(fmt, src, out, card=str(card))
        except TraceError:
            event(f"{fmt}: TraceError")
            assert not out.exists()
            return
        event(f"{fmt}: imported")
        assert validate_trace(out).rows > 0
