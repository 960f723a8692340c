"""The paper agrees with its sources: every committed table equals what its own command writes
from the committed results (no training), every number the paper quotes equals the cell it names
in those regenerated tables, and the included tables are the files' current content. Each check
is also shown to fail: a wrong quote, a changed table cell, a stale include, an unmarked number.

A user who ran the README's main job before the tests has a fresh ``paper/tables/heads.md`` of
their own in the working tree (other gate noise, other numbers): a table passes when it, or its
committed version (``git show HEAD:...``), equals the regeneration, and the other checks read the
regenerated tables, not the working tree's."""
import pathlib
import re
import shutil
import subprocess

import pytest

from learnmask.cli import main
from learnmask.paper.build import check
from learnmask.paper.includes import refresh_includes
from learnmask.paper.quotes import (
    Quote,
    cell,
    check_quotes,
    expected,
    find_quotes,
    normalize,
    unmarked_numbers,
)
from learnmask.paper.regenerate import gather, stale_tables, table_command

ROOT = pathlib.Path(__file__).parents[1]
PAPER = ROOT / "paper" / "paper.md"
TABLES = ROOT / "paper" / "tables"
RESULTS = ROOT / "paper" / "results"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """Every generated table written again from the committed results: (regenerations, problems,
    a folder with every regenerated file under its committed name)."""
    out = tmp_path_factory.mktemp("regenerated")
    done, problems = stale_tables(ROOT, out / "each")
    return done, problems, gather(done, out / "all")


def _committed(name: str) -> bytes | None:
    """``paper/tables/<name>`` as committed at HEAD (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:paper/tables/{name}"], capture_output=True,
                              timeout=60)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def _rewritten_by_a_run(problem: str, flat: pathlib.Path) -> bool:
    """A "differs from its regeneration" problem of a table whose committed version is the
    regeneration: the user's own run rewrote the working tree's copy."""
    path, sep, what = problem.partition(": ")
    name = pathlib.Path(path).name
    return bool(sep) and what.startswith("differs from its regeneration") and (flat / name).is_file() \
        and _committed(name) == (flat / name).read_bytes()


def test_every_generated_table_equals_its_regeneration_from_the_committed_results(regenerated):
    done, problems, flat = regenerated
    assert [p for p in problems if not _rewritten_by_a_run(p, flat)] == []
    generated = {t.name for t in TABLES.glob("*.md") if table_command(t.read_text())}
    # every table that names its command, its .tex and the pages written beside it, byte for byte
    expected_files = generated | {t.with_suffix(".tex").name for t in TABLES.glob("*.md")
                                  if table_command(t.read_text()) and t.with_suffix(".tex").exists()}
    assert {f.name for f in flat.iterdir()} == expected_files
    assert {"heads.md", "heads-full.tex", "controllers.md", "mlm-full.md", "tokens.md", "tokens-kept.md",
            "tokens-images-layer0.md", "interference.tex"} <= expected_files
    assert all((flat / name).read_bytes() in ((TABLES / name).read_bytes(), _committed(name))
               for name in expected_files)
    assert len(done) == 9  # the grids' tables; tokens-kept.md comes with tokens.md


def test_a_changed_table_cell_is_caught_by_the_regeneration(tmp_path, regenerated):
    (tmp_path / "paper" / "tables").mkdir(parents=True)
    (tmp_path / "paper" / "results").mkdir()
    shutil.copy(RESULTS / "heads.jsonl", tmp_path / "paper" / "results")
    shutil.copy(regenerated[2] / "heads.tex", tmp_path / "paper" / "tables")
    right = (regenerated[2] / "heads.md").read_text()
    edited = right.replace("| 90% | 92.2 |", "| 90% | 92.3 |")
    assert edited != right
    (tmp_path / "paper" / "tables" / "heads.md").write_text(edited)
    done, problems = stale_tables(tmp_path, tmp_path / "out")
    assert [r.command for r in done] == ["learnmask reproduce heads"]
    where = tmp_path / "paper" / "tables" / "heads.md"
    (problem,) = problems
    assert problem.startswith(f"{where}: differs from its regeneration by `learnmask reproduce heads` from the records "
                              f"in {tmp_path / 'paper' / 'results'} (if you reran that command")


def test_every_quote_in_the_paper_equals_its_cell_in_the_regenerated_tables(regenerated):
    text = PAPER.read_text()
    quotes = find_quotes(text)
    assert len(quotes) >= 90
    assert {q.source for q in quotes} >= {"tables/heads.md", "tables/heads-full.md", "tables/controllers-full.md",
                                          "tables/mlm-full.md", "tables/tokens.md", "tables/tokens-images-layer0.md",
                                          "tables/interference.md", "results/bench-attention-gpu.json"}
    assert check_quotes(text, tables=regenerated[2], results=RESULTS) == []


def _wrong(text: str, right: str, wrong: str) -> str:
    assert text.count(right) == 1, right
    return text.replace(right, wrong)


@pytest.mark.parametrize(("right", "wrong", "message"), [
    # a cell quote one digit off
    ("reach 92.0<!--", "reach 92.1<!--", "quotes 92.1 but tables/heads-full.md [hard-concrete gates + Lagrangian | 90% "
                                         "| Accuracy (%)] holds 92.0"),
    # the sign of a goal line's difference
    ("\n−2.1<!--", "\n2.1<!--", "quotes 2.1 but tables/heads-full.md [after of dense:] holds -2.1"),
    # a benchmark value rounded wrongly
    ("e.g.\n0.61<!-- results/bench-attention-gpu-run2.json: cases.0.speed_vs_flex.fwd -->",
     "e.g.\n0.60<!-- results/bench-attention-gpu-run2.json: cases.0.speed_vs_flex.fwd -->",
     "quotes 0.60 but results/bench-attention-gpu-run2.json [cases.0.speed_vs_flex.fwd] holds 0.61"),
    # the right number from the wrong row
    ("91.9<!-- tables/heads-full.md: importance-based removal (Michel et al., 2019) | 90% |",
     "91.9<!-- tables/heads-full.md: importance-based removal (Michel et al., 2019) | 50% |", "holds 94.3"),
    # a precision the table does not print
    ("reach 92.0<!--", "reach 92.00<!--", "quotes 92.00 but"),
    # a row that is not unique, a column that does not exist
    ("92.0<!-- tables/heads-full.md: hard-concrete gates + Lagrangian | 90% |",
     "92.0<!-- tables/heads-full.md: hard-concrete gates + Lagrangian |", "matches 2 rows; expected 1"),
    ("| 90% | Speed-up vs dense -->×", "| 90% | Speedup -->×", "column 'Speedup': the columns are"),
    # a source comment the markup does not see (a space before it): the number is unchecked
    ("reach 92.0<!--", "reach 92.0 <!--", "a source comment with no number right before it"),
])
def test_a_wrong_quote_is_detected(regenerated, right, wrong, message):
    text = _wrong(PAPER.read_text(), right, wrong)
    problems = check_quotes(text, tables=regenerated[2], results=RESULTS)
    assert len(problems) == 1 and message in problems[0], problems
    comment = text.rindex("<!--", 0, text.index(wrong) + len(wrong))  # the edited quote's comment
    assert problems[0].startswith(f"line {text[:comment].count(chr(10)) + 1}: ")


def _linked_checkout(folder: pathlib.Path, regenerated_tables: pathlib.Path) -> pathlib.Path:
    """A checkout in ``folder`` whose sources link to this one's, its tables the regenerated ones
    (what the tests above proved the committed ones are); returns where its paper.md goes."""
    (folder / "experiments").symlink_to(ROOT / "experiments")  # (a table's --grid-file)
    (folder / "paper").mkdir()
    for name in ("results", "figures"):
        (folder / "paper" / name).symlink_to(ROOT / "paper" / name)
    shutil.copytree(regenerated_tables, folder / "paper" / "tables")
    return folder / "paper" / "paper.md"


def test_the_build_command_checks_the_paper_and_fails_on_a_wrong_quote(tmp_path, capsys, regenerated):
    copy = _linked_checkout(tmp_path, regenerated[2])
    copy.write_text(PAPER.read_text())
    assert main(["paper", "--check", str(copy)]) == 0
    assert "every quote equal to its source" in capsys.readouterr().out
    copy.write_text(_wrong(PAPER.read_text(), "(88.8<!--", "(88.7<!--"))
    assert main(["paper", "--check", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "quotes 88.7 but tables/heads-full.md [random heads removed before fine-tuning | 90% | Accuracy (%)] " \
           "holds 88.8" in err and "1 problems" in err
    assert len(check(copy, root=tmp_path)) == 1


def test_the_included_tables_are_fresh_and_a_stale_one_is_caught(tmp_path, capsys, regenerated):
    text = PAPER.read_text()
    copy = _linked_checkout(tmp_path, regenerated[2])
    new, files = refresh_includes(text, copy.parent)
    assert new == text
    assert [f.name for f in files] == ["heads.md", "heads-full.md", "controllers-full.md", "controllers.md",
                                       "mlm-full.md", "mlm.md", "tokens.md", "tokens-images-layer0.md",
                                       "interference.md"]
    assert "### Learned head gates vs baselines" in text and "\n# Learned head gates" not in text  # demoted
    # a number edited inside an included table: --check reports it, the build puts it back
    stale = _wrong(text, "| straight-through top-k gates | 90% | 89.8 | 4.3 |", "| straight-through top-k gates | "
                   "90% | 89.9 | 4.3 |")
    assert refresh_includes(stale, copy.parent)[0] == text
    copy.write_text(stale)
    assert main(["paper", "--check", str(copy)]) == 1
    assert "included tables are stale; run `learnmask paper` to refresh them" in capsys.readouterr().err
    assert main(["paper", str(copy)]) == 0
    assert copy.read_text() == text


def test_broken_include_markers_are_clear_errors(tmp_path):
    (tmp_path / "t.md").write_text("# T\n| a |\n|---|\n| 1 |\n")
    assert refresh_includes("x\n<!-- include: t.md -->\nold\n<!-- end include -->\ny\n", tmp_path)[0] == (
        "x\n<!-- include: t.md -->\n### T\n| a |\n|---|\n| 1 |\n<!-- end include -->\ny\n")
    with pytest.raises(ValueError, match=r"line 2: <!-- include: t.md --> has no <!-- end include --> line"):
        refresh_includes("x\n<!-- include: t.md -->\nold\n", tmp_path)
    with pytest.raises(ValueError, match=r"line 1: included file .*missing.md does not exist"):
        refresh_includes("<!-- include: missing.md -->\n<!-- end include -->\n", tmp_path)


def test_no_unmarked_decimal_in_the_prose_and_an_unmarked_one_is_caught():
    text = PAPER.read_text()
    assert unmarked_numbers(text) == []
    added = text.replace("## 9. Limitations\n", "## 9. Limitations\n\nDense reaches 94.1% on TREC-6.\n")
    assert [line.split(" ")[0] for line in unmarked_numbers(added)] == ["94.1"]
    assert unmarked_numbers("a\n<!-- x\ny -->\n`1.5`\nwe got 0.25<!-- tables/t.md: a | b --> and 3.5\n") == [
        "3.5 (line 5: …a we got ⟨quoted⟩ and 3.5…)"]  # the source's line, the quote shown as such
    declared = added.replace("<!-- numbers not from tables: ", "<!-- numbers not from tables: 94.1 ")
    assert unmarked_numbers(declared) == []
    # a unit may follow a number; versions and names are not numbers
    assert [line.split(" ")[0] for line in unmarked_numbers("a 1.8M model, torch 2.13.0, v2.0, 3.5x")] == ["1.8", "3.5"]
    # numbers in code spans, headings and included tables are not prose
    assert unmarked_numbers("## 1.5 Finalize\n`beta = 0.66`\n<!-- include: x -->\n92.2\n<!-- end include -->\n") == []


def test_the_scale_out_section_is_written_and_every_figure_exists():
    text = PAPER.read_text()
    section = re.search(r"^## \d+\. Scale-out \(DDP\)\n(.+?)^## ", text, re.M | re.S)
    assert section and "TODO" not in section.group(1) and "tests/test_distributed.py" in section.group(1)
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text)
    assert len(figures) == 7 and all((PAPER.parent / f).is_file() for f in figures)


TABLE = """# T

| Method | Target | Acc | ± CI | Loss | ± CI | Notes |
|---|---:|---:|---:|---:|---:|---|
| gates | 50% | 93.5 | 1.6 | 4.888 | 0.033 | -3.3 (p < 0.0001, McNemar) |
| gates | 90% | 92.0 | 0.8 | 4.806 | 0.042 | 77.0 before re-training |
| random | 90% | 88.8 | n/a | 4.9 | n/a | |

- goal: -2.1 points (goal ≥ -2.5): met
"""


@pytest.mark.parametrize(("selector", "value"), [
    ("gates | 90% | Acc", "92.0"),
    ("random | Acc", "88.8"),
    ("gates | 90% | ± CI#1", "0.8"),
    ("gates | 90% | ± CI#2", "0.042"),
    ("gates | 50% | Notes", "-3.3 (p < 0.0001, McNemar)"),
])
def test_cell_reads_the_row_by_its_first_cells_and_the_column_by_its_header(selector, value):
    assert cell(TABLE, selector) == value


@pytest.mark.parametrize(("selector", "message"), [
    ("gates | Acc", "row 'gates' matches 2 rows"),
    ("nothing | Acc", "row 'nothing' matches 0 rows"),
    ("gates | 90% | ± CI", "column '± CI'"),
    ("gates | 90% | ± CI#3", "column '± CI#3'"),
])
def test_cell_refuses_ambiguous_or_missing_selectors(selector, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cell(TABLE, selector)


def test_expected_takes_the_first_number_of_a_cell_or_after_a_text(tmp_path):
    (tmp_path / "t.md").write_text(TABLE)
    (tmp_path / "r.json").write_text('{"cases": [{"x": 0.6064749921155685}], "n": 7}')

    def want(number, source, selector):
        return expected(Quote(number, source, selector, 1), tables=tmp_path, results=tmp_path)

    assert want("-3.3", "tables/t.md", "gates | 50% | Notes") == "-3.3"
    assert want("77.0", "tables/t.md", "gates | 90% | Notes") == "77.0"
    assert want("−2.1", "tables/t.md", "after goal:") == "-2.1"
    assert want("0.61", "results/r.json", "cases.0.x") == "0.61"
    assert want("0.6065", "results/r.json", "cases.0.x") == "0.6065"
    assert want("7", "results/r.json", "n") == "7"
    with pytest.raises(ValueError, match="no number in 'n/a'"):
        want("1", "tables/t.md", "random | ± CI#1")
    with pytest.raises(ValueError, match=re.escape("'gates' occurs 2 times; expected once")):
        want("1", "tables/t.md", "after gates")
    with pytest.raises(ValueError, match=re.escape("'cases.1.x': no '1' there")):
        want("1", "results/r.json", "cases.1.x")


def test_numbers_compare_as_written():
    assert normalize("−1,234.5") == "-1234.5" and normalize("+0.4") == "0.4" and normalize("93.90") == "93.90"
    quotes = find_quotes("a 93.9<!-- tables/t.md: x | y -->% b −2.3<!-- tables/t.md: after z: --> c 5 <!-- no -->")
    assert [(q.number, q.source, q.selector) for q in quotes] == [("93.9", "tables/t.md", "x | y"),
                                                                   ("−2.3", "tables/t.md", "after z:")]
