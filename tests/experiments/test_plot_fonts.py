"""Every PDF the project writes embeds TrueType (Type 42) fonts, never Type 3: the ACM and IEEE
PDF checks refuse Type 3 fonts, matplotlib's default. Checked with ``pdffonts`` where poppler is
installed, else by reading the font dictionaries of the PDF itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pandas as pd
import pytest

from moesim.experiments import plot_validation as pv
from moesim.experiments.plot import main as plot_main
from moesim.experiments.plot import plot_timeline
from moesim.hw_profiles.measure import main as profile_main
from moesim.traces.cli import main as traces_main
from tests.experiments.test_plot import runs, write_sweep
from tests.traces.fixtures import write_moe_beyond

_SUBTYPE = re.compile(rb"/Subtype\s*/(Type3|TrueType|Type1|Type0|CIDFontType[02]|Type1C)\b")


def _objects(data: bytes) -> list[bytes]:
    """The PDF's bytes plus each decompressed stream (fonts may sit in object streams)."""
    out = [data]
    for m in re.finditer(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            out.append(zlib.decompress(m.group(1)))
        except zlib.error:
            continue
    return out


def font_types(pdf: Path) -> set[str]:
    """The font types a PDF uses (``Type3``, ``TrueType``, ...), from its font dictionaries."""
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-", pdf
    found = {m.group(1).decode() for part in _objects(data) for m in _SUBTYPE.finditer(part)}
    if shutil.which("pdffonts"):  # poppler's view, where it is installed, must agree
        text = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True,
                              check=True).stdout
        assert ("Type 3" in text) == ("Type3" in found), text
    return found


def assert_venue_fonts(pdf: Path) -> None:
    types = font_types(pdf)
    assert types, f"{pdf.name}: no font found (text drawn as paths?)"
    assert "Type3" not in types, f"{pdf.name}: Type 3 fonts {sorted(types)}"
    assert types <= {"TrueType", "Type0", "CIDFontType2"}, f"{pdf.name}: {sorted(types)}"


def test_the_checker_sees_type3_fonts(tmp_path: Path) -> None:
    """Without the setting matplotlib writes Type 3; the check must notice (it can fail)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xlabel("hit rate (%) µs")
    with plt.rc_context({"pdf.fonttype": 3}):
        fig.savefig(tmp_path / "t3.pdf")
    plt.close(fig)
    assert "Type3" in font_types(tmp_path / "t3.pdf")


def test_sweep_figure_uses_truetype(tmp_path: Path) -> None:
    df = runs(**{"policy.name": ("lru", "belady"), "cache.capacity_fraction": (0.05, 0.1, 0.5)})
    write_sweep(df, tmp_path / "sweep")
    assert plot_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "figs")]) == 0
    pdfs = sorted((tmp_path / "figs").glob("*.pdf"))
    assert pdfs
    for pdf in pdfs:
        assert_venue_fonts(pdf)


def test_timeline_and_validation_figures_use_truetype(tmp_path: Path) -> None:
    import json

    events = [{"name": "attention", "tid": "compute", "ts": 0.0, "dur": 50.0},
              {"name": "demand e1", "tid": "host link", "ts": 10.0, "dur": 80.0}]
    (tmp_path / "timeline.json").write_text(json.dumps({"traceEvents": events}))
    (pdf,) = plot_timeline(tmp_path / "timeline.json", tmp_path / "tl", formats=("pdf",))
    assert_venue_fonts(pdf)
    table = pd.DataFrame({"policy": ["lru", "belady"], "trace": ["t", "t"],
                          "sim_time_per_output_token_s": [1e-3, 2e-3],
                          "real_time_per_output_token_s": [1.1e-3, 1.9e-3]})
    (pdf,) = pv.plot_validation(pv.tidy(table), tmp_path / "val", formats=("pdf",))
    assert_venue_fonts(pdf)


def test_link_curve_and_trace_statistics_figures_use_truetype(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert profile_main(["plot", "v100_pcie", "--out", str(tmp_path / "curves.pdf")]) == 0
    assert_venue_fonts(tmp_path / "curves.pdf")
    write_moe_beyond(tmp_path / "src", {1: 6, 2: 4})
    trace = tmp_path / "t.parquet"
    assert traces_main(["import", "-q", "-f", "moe-beyond-csv", str(tmp_path / "src"),
                        str(trace)]) == 0
    assert traces_main(["stats", str(trace), "--out", str(tmp_path / "st")]) == 0
    capsys.readouterr()
    pdfs = sorted((tmp_path / "st").glob("*.pdf"))
    assert len(pdfs) >= 5
    for pdf in pdfs:
        assert_venue_fonts(pdf)


def test_committed_pdf_figures_use_truetype() -> None:
    root = Path(__file__).resolve().parents[2]
    pdfs = sorted((root / "experiments" / "figures").glob("*.pdf"))
    for pdf in pdfs:
        assert_venue_fonts(pdf)
