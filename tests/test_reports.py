from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reports.render import render_report, tex_escape
from reports.tables import load_paper_table1, table1

# Our backbone names -> the paper backbone they are compared against (config: paper_name).
BACKBONE_MAP = {"tiny-blip2-opt": "blip2-opt", "tiny-minigpt4": "minigpt4"}
from unike.store import aggregate, open_readonly, write_run

REPO = Path(__file__).resolve().parents[1]


def _row(run_id: str, i: int, task: str, rel: float) -> dict:
    return {
        "run_id": run_id, "case_id": f"c{i}", "task": task, "sequence_id": 0,
        "rel": rel, "t_gen": 0.5, "m_gen": 0.5, "t_loc": 1.0, "m_loc": 1.0,
        "rel_em": rel, "t_gen_em": 0.5, "m_gen_em": 0.5, "edit_s": 0.01,
    }


def _run(tmp: Path, run_id: str, method: str, task: str, rels: list[float], regime: str = "one-step",
         device: str = "cpu") -> tuple[Path, Path]:
    prov = {
        "run_id": run_id, "method": method, "backbone": "tiny-blip2-opt", "task": task, "regime": regime,
        "seed": 0, "n_edits": len(rels), "config_hash": "cfg" + run_id, "code_version": "v1",
        "metric_version": "1", "device": device, "wall_s": 3.0, "edit_s_mean": 0.01, "peak_mem_mb": 100.0,
    }
    files = tmp / f"{run_id}.parquet", tmp / f"{run_id}.json"
    write_run(*files, [_row(run_id, i, task, r) for i, r in enumerate(rels)], prov)
    return files


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    files = [
        _run(tmp, "ft-vqa", "ft", "e-vqa", [1.0, 0.5]),
        # A sequential run must not leak into Table 1 (it would pull the mean to 50.0).
        _run(tmp, "ft-vqa-seq", "ft", "e-vqa", [0.0, 0.0], regime="seq-10"),
        _run(tmp, "new-vqa", "newbaseline", "e-vqa", [0.25, 0.25, 0.25], device="<gpu & co>"),
    ]
    path = tmp / "results.duckdb"
    aggregate(files, path)
    return path


@pytest.fixture(scope="module")
def out(db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render_report(db, out, BACKBONE_MAP)
    return out


def test_table1_values(db: Path) -> None:
    with open_readonly(db) as con:
        t = table1(con, BACKBONE_MAP)
    c = t.cell("tiny-blip2-opt", "ft", "e-vqa", "rel")
    assert c.ours == pytest.approx(75.0) and c.paper == 58.7 and c.diff == pytest.approx(16.3)
    assert t.row("tiny-blip2-opt", "ft").n == {"e-vqa": 2, "e-ic": 0}
    assert t.cell("tiny-blip2-opt", "ft", "e-ic", "rel").ours is None
    assert t.cell("tiny-blip2-opt", "newbaseline", "e-vqa", "rel").paper is None
    # Paper-order rows first, the new baseline last; minigpt4 is shown paper-only.
    group = t.groups[0]
    assert [r.method for r in group.rows] == ["backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac",
                                              "unike", "newbaseline"]
    assert [g.label for g in t.groups] == ["tiny-blip2-opt (paper: BLIP-2 OPT)", "MiniGPT-4 (paper only)"]
    assert t.cell("minigpt4", "unike", "e-ic", "m_loc").paper == 87.3


def test_reference_is_packaged() -> None:
    assert len(load_paper_table1()) == 32  # 2 backbones x 8 methods x 2 tasks


def test_rendered_files(out: Path) -> None:
    md = (out / "tables/table1.md").read_text(encoding="utf-8")
    html = (out / "tables/table1.html").read_text(encoding="utf-8")
    tex = (out / "tables/table1.tex").read_text(encoding="utf-8")
    index = (out / "index.html").read_text(encoding="utf-8")

    assert "| FT (last layer) | 75.0 (58.7, +16.3) |" in md
    assert re.search(r"^\| newbaseline \| 25\.0 \(–\) \|.* 3 \|", md, re.M)
    assert "– (85.3)" in md  # paper-only cell (KE, E-VQA Rel.)
    for text in (html, index):
        assert "75.0<br><small>(58.7, +16.3)</small>" in text
        assert 'title="paper 58.7; ours − paper +16.3"' in text
        assert "<td class=\"method\">newbaseline</td>" in text
    assert r"75.0\,{\tiny(58.7)}" in tex and "\nnewbaseline & 25.0" in tex
    assert tex.startswith("\\begin{table*}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\cmidrule(lr){2-7}\cmidrule(lr){8-13}" in tex

    # Offline page: no external resources, links to the other formats, provenance, autoescape.
    assert "http" not in index and "<script" not in index
    assert 'href="tables/table1.md"' in index and 'href="tables/table1.tex"' in index
    assert "NeurIPS 2024" in index and "per-edit rows" in index
    assert "<td>ft-vqa-seq</td><td>ft</td>" in index and "<td>cfgft-vqa</td>" in index
    assert "&lt;gpu &amp; co&gt;" in index and "<gpu" not in index


def test_render_is_deterministic_and_read_only(db: Path, out: Path, tmp_path: Path) -> None:
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    render_report(db, tmp_path, BACKBONE_MAP)
    for rel in ("index.html", "tables/table1.md", "tables/table1.html", "tables/table1.tex"):
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_tex_escape() -> None:
    assert tex_escape("a_b & 50% #1 {x} $y$ ~^\\") == (
        r"a\_b \& 50\% \#1 \{x\} \$y\$ \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_reports_do_not_import_model_code() -> None:
    code = (
        "import sys, reports.render, reports.tables\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'unike'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
