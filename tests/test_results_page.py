"""benchmarks/RESULTS.md stays a page of current numbers, in step with benchmarks/results/ and goals.yaml.

- the page is at most 400 lines, and links its archive;
- every file in benchmarks/results/ (not archive/) is named on it, and every results/ file it names exists;
- every file in results/archive/ is named in RESULTS_ARCHIVE.md or archive/README.md;
- every `RESULTS.md#anchor` link in the README, docs/ and the package points at a heading of the page,
  and every in-page `(#anchor)` link too;
- every threshold in benchmarks/goals.yaml is read by the benchmark it names, and the goals' printed
  names are those the benchmarks printed before the thresholds moved out of their code.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PAGE = BENCH / "RESULTS.md"
RESULTS = BENCH / "results"
ARCHIVE = RESULTS / "archive"
MAX_LINES = 400


def _page() -> str:
    return PAGE.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors() -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", _page(), flags=re.M)}


def test_page_is_short_and_links_its_archive():
    lines = _page().splitlines()
    assert len(lines) <= MAX_LINES, f"RESULTS.md has {len(lines)} lines (at most {MAX_LINES}): move history to RESULTS_ARCHIVE.md"
    assert "RESULTS_ARCHIVE.md" in _page() and (BENCH / "RESULTS_ARCHIVE.md").is_file()
    assert "## Summary" in _page()


def test_every_result_file_is_named_on_the_page():
    page = _page()
    files = sorted(p.name for p in RESULTS.iterdir() if p.is_file())
    assert files, "benchmarks/results/ is empty"
    missing = [f for f in files if f"results/{f}" not in page]
    assert not missing, f"in benchmarks/results/ but not on RESULTS.md (name them, or git mv them to archive/): {missing}"


def test_every_result_file_the_page_names_exists():
    named = set(re.findall(r"results/((?:archive/)?[\w.\-]+\.(?:json|png|xml|md))", _page()))
    assert named
    absent = sorted(n for n in named if not (RESULTS / n).is_file())
    assert not absent, f"RESULTS.md names files that benchmarks/results/ does not have: {absent}"


def test_every_archived_file_is_named_in_the_archive():
    text = (BENCH / "RESULTS_ARCHIVE.md").read_text() + (ARCHIVE / "README.md").read_text()
    files = sorted(p.name for p in ARCHIVE.iterdir() if p.is_file() and p.name != "README.md")
    missing = [f for f in files if f not in text]
    assert not missing, f"in results/archive/ but named in neither RESULTS_ARCHIVE.md nor archive/README.md: {missing}"


def test_links_to_the_page_point_at_its_headings():
    anchors = _anchors()
    bad = []
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "python").rglob("*.py")),
               *sorted((ROOT / "python").rglob("*.yaml")), *sorted(BENCH.glob("*.py")), *sorted(BENCH.glob("*.md"))]
    for path in sources:
        for anchor in re.findall(r"RESULTS\.md#([\w\-]+)", path.read_text()):
            if anchor not in anchors:
                bad.append(f"{path.relative_to(ROOT)}: #{anchor}")
    for anchor in re.findall(r"\]\(#([\w\-]+)\)", _page()):
        if anchor not in anchors:
            bad.append(f"benchmarks/RESULTS.md: #{anchor}")
    assert not bad, f"links to headings RESULTS.md does not have (its headings: {sorted(anchors)}): {bad}"


def test_page_keeps_the_sections_others_fill():
    page = _page()
    assert "## NCP as its authors ran it (issue 26)" in page
    assert "## The default run" in page
    # the default run's section reports the default's own numbers
    default = page.split("## The default run", 1)[1].split("\n## ", 1)[0]
    assert "results/default_seeds_kto600.json" in default and "KTO" in default


# ---------------------------------------------------------------- goals.yaml

def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_results_page_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def goals_mod():
    mod = _bench_module("goals")
    return mod


def test_goal_lookup_names_what_is_missing(goals_mod):
    assert goals_mod.goal("step.dpo_mfu.sd15") == 0.27
    with pytest.raises(KeyError, match="nope"):
        goals_mod.goal("step.nope")
    with pytest.raises(KeyError, match="group"):
        goals_mod.goal("step.dpo_mfu")


def test_every_goal_is_read_by_its_benchmark():
    """Run each benchmark's goal function on made-up measurements and check it looked up all its thresholds."""
    step = _bench_module("step")
    e2e = _bench_module("e2e")
    default_seeds = _bench_module("default_seeds")
    generate = _bench_module("generate")
    import goals  # the module the benchmarks imported (benchmarks/ is on sys.path now)

    goals.READ.clear()
    res = [{"device": "cuda", "model": m, "resolution": step.MODELS[m]["resolution"]} for m in ("sd15", "sdxl")]
    summary = {"sd15": {"dpo_mfu": 0.28, "ncp_dpo_mfu_over_dpo_mfu": 0.9, "dpo_over_baseline_pairs_per_s": 1.7},
               "sdxl": {"dpo_mfu": 0.2, "ncp_dpo_mfu_over_dpo_mfu": 0.99}}
    assert step.goals(res, summary) == {  # the names step.py printed with its thresholds in the code
        "sd15: ncp DPO step >= 27% MFU": True, "sd15: NCP-DPO MFU within 5 % of DPO's": False,
        "sd15: ncp DPO pairs/s >= 1.6x the baseline step": True,
        "sdxl: ncp DPO step >= 25% MFU": False, "sdxl: NCP-DPO MFU within 5 % of DPO's": True}
    rows = [{"device": "cuda", "model": "sd15", "pipeline": "baseline"}]
    e2e_summary = {"sd15 ncp-cache dpo / baseline pairs/s": 2.1, "sd15 ncp-jpeg dpo / baseline pairs/s": 1.4}
    assert e2e.goals(rows, e2e_summary, True) == {
        "sd15: ncp-cache (DPO) >= 2.0x the baseline pipeline's pairs/s": True,
        "sd15: ncp-jpeg (DPO) >= 1.5x the baseline pipeline's pairs/s": False,
        "sdxl: ncp-cache (DPO) >= 3.0x the baseline pipeline's pairs/s": None,
        "sdxl: ncp-jpeg (DPO) >= 2.0x the baseline pipeline's pairs/s": None}
    seeds = [{"gain_ci95": [0.01, 0.05]}] * 5
    assert default_seeds.goals({"mean_gain": 0.03, "seeds": seeds, "seeds_with_interval_above_0": 4}) == {
        "mean gain over seeds >= +0.02": True, "every seed's interval above 0": False}

    assert generate.goals(0.95) == {"generate -> score -> write >= 0.9x sampling alone's images/s": True}
    assert list(generate.goals(0.85).values()) == [False]

    unread = sorted(set(goals.names()) - goals.READ)
    assert not unread, f"goals.yaml thresholds no benchmark reads: {unread}"
    for bench in goals.load():
        script = BENCH / goals.read_by(bench)
        assert script.is_file(), f"goals.yaml: {bench}'s read_by names {script.name}, which does not exist"
        assert "from goals import goal" in script.read_text(), f"{script.name} does not read goals.yaml"


def test_benchmarks_hold_no_goal_thresholds():
    """The thresholds that moved to goals.yaml do not come back as literals in the goal functions."""
    for name, literals in {"step.py": ["0.27", "0.25", "0.95", ">= 1.6"], "e2e.py": [": 2.0", ": 1.5", ": 3.0"]}.items():
        src = (BENCH / name).read_text()
        body = src.split("def goals(", 1)[1].split("\ndef ", 1)[0]
        found = [lit for lit in literals if lit in body]
        assert not found, f"{name} goals() hard-codes {found}: put it in benchmarks/goals.yaml"
