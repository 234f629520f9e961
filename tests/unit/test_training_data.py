"""Training data through the I/O layer: reading every format, validation (error and skip
modes), the duplicate-ID check, splits, row limits, fingerprints."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import DataConfig
from sentiment_ray.io import files as io_files
from sentiment_ray.io import readers as io_readers
from sentiment_ray.io.files import expand_paths, fingerprint
from sentiment_ray.io.ids import IdIndex
from sentiment_ray.io.values import DataError, text_problem
from sentiment_ray.labels import LabelSet
from sentiment_ray.train.data import apply_row_limits, load_labelled, split_train_validation, stratified_subsample

REPO = Path(__file__).resolve().parents[2]
DEMO_CSV = REPO / "data" / "demo" / "sentiment_demo.csv"
LABELS = LabelSet(["Positive", "Negative"])
HEADER = b"ID,sentence,label,lang\n"


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def core(table: pa.Table) -> list[tuple]:
    """The data columns, row by row, ignoring where the rows came from."""
    names = [c for c in ("ID", "sentence", "label", "lang") if c in table.column_names]
    return list(zip(*(table.column(c).to_pylist() for c in names)))


@pytest.fixture(scope="module")
def demo() -> pa.Table:
    return load_labelled(str(DEMO_CSV), cfg(), LABELS).table


@pytest.fixture(scope="module")
def demo_small_table() -> pa.Table:
    """The first 200 demo rows, every column a string."""
    header = DEMO_CSV.read_text(encoding="utf-8").split("\n", 1)[0].split(",")
    options = pacsv.ConvertOptions(column_types={name: pa.string() for name in header})
    return pacsv.read_csv(DEMO_CSV, convert_options=options).slice(0, 200)


# ----------------------------------------------------------------------------- the demo data


def test_demo_csv_loads_every_row_with_canonical_labels(demo):
    assert demo.num_rows == 4000
    assert set(demo.column("label").to_pylist()) == {"Positive", "Negative"}
    assert demo.column_names == ["sentence", "label", "lang", "ID", "source_file", "source_row"]
    assert demo.column("source_row").to_pylist() == list(range(1, 4001))
    assert set(demo.column("source_file").to_pylist()) == {str(DEMO_CSV)}
    assert demo.column("ID").to_pylist()[0] == "dev-000000"


def test_csv_values_are_kept_exactly_as_written(tmp_path):
    path = write_bytes(tmp_path / "ids.csv", HEADER + b"007,fine text,positive,en\n")
    loaded = load_labelled(path, cfg(), LABELS).table
    assert loaded.column("ID").to_pylist() == ["007"]
    assert loaded.column("label").to_pylist() == ["Positive"]  # case-normalised


def test_training_keeps_ids_as_written_and_labels_canonical(tmp_path):
    path = write_bytes(tmp_path / "ids.csv", HEADER + b'7,a,Positive,en\n" 7", b ," Negative ",en\n"\t=tab",c,positive,en\n')
    loaded = load_labelled(path, cfg(), LABELS).table
    assert loaded.column("ID").to_pylist() == ["7", " 7", "\t=tab"]  # two IDs, not a duplicate
    assert loaded.column("label").to_pylist() == ["Positive", "Negative", "Positive"]


# ----------------------------------------------------------------------------- formats and paths


def test_csv_parquet_jsonl_and_gzip_read_the_same_rows(tmp_path, demo_small_table):
    expected = core(load_labelled(str(DEMO_CSV), cfg(max_train_rows=None), LABELS).table.slice(0, 200))
    pacsv.write_csv(demo_small_table, tmp_path / "d.csv")
    pq.write_table(demo_small_table, tmp_path / "d.parquet")
    records = demo_small_table.to_pylist()
    write_jsonl(tmp_path / "d.jsonl", records)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with gzip.open(tmp_path / "d.csv.gz", "wb") as f:
        f.write((tmp_path / "d.csv").read_bytes())
    (tmp_path / "array.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for name in ("d.csv", "d.parquet", "d.jsonl", "d.jsonl.gz", "d.csv.gz", "array.json"):
        assert core(load_labelled(str(tmp_path / name), cfg(), LABELS).table) == expected, name


def test_glob_directory_and_file_uri_read_the_same_rows(tmp_path, demo_small_table):
    data_dir = tmp_path / "parts"
    data_dir.mkdir()
    pacsv.write_csv(demo_small_table.slice(0, 120), data_dir / "part-1.csv")
    pq.write_table(demo_small_table.slice(120), data_dir / "part-2.parquet")
    (data_dir / "_SUCCESS").write_text("")  # marker files are not data
    expected = core(load_labelled(str(DEMO_CSV), cfg(), LABELS).table.slice(0, 200))
    for spec in (str(data_dir), str(data_dir / "part-*"), f"file://{data_dir}", f"file://{data_dir}/part-*"):
        loaded = load_labelled(spec, cfg(), LABELS)
        assert core(loaded.table) == expected, spec
        assert [Path(f).name for f in loaded.files] == ["part-1.csv", "part-2.parquet"], spec
        rows = Counter(loaded.table.column("source_file").to_pylist())
        assert sorted(rows.values()) == [80, 120]


def test_files_a_folder_holds_but_are_not_read_are_named(tmp_path):
    from sentiment_ray.io.files import expand_inputs, not_read_warning

    (tmp_path / "sub").mkdir()
    for rel in ("a.csv", "notes.txt", "sub/b.parquet", "sub/README", "_SUCCESS", ".DS_Store"):
        (tmp_path / rel).write_text("")
    inputs = expand_inputs(str(tmp_path))
    assert inputs.files == [str(tmp_path / "a.csv"), str(tmp_path / "sub" / "b.parquet")]
    assert inputs.not_read == [str(tmp_path / n) for n in (".DS_Store", "_SUCCESS", "notes.txt", "sub/README")]
    assert not_read_warning(str(tmp_path), inputs.not_read) == (
        f"{tmp_path}: 4 files there are not read (not .csv, .parquet, .pq, .jsonl, .json (text formats optionally .gz), "
        "or a hidden name starting with '.' or '_'): .DS_Store, _SUCCESS, notes.txt, sub/README"
    )
    assert expand_inputs(str(tmp_path / "a.csv")).not_read == []  # a file names only itself


def test_expand_paths_sorted_and_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ("b/z.csv", "a.csv", "b/y.jsonl", ".hidden/x.csv"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x")
    names = [str(Path(p).relative_to(tmp_path)) for p in expand_paths(str(tmp_path))]
    assert names == ["a.csv", "b/y.jsonl", "b/z.csv"]


@pytest.mark.parametrize("spec", ["does/not/exist.csv", "nothing-*.parquet", "file:///no/such/dir/x.csv"])
def test_a_path_that_matches_nothing_names_it(tmp_path, spec):
    target = spec if spec.startswith("file://") else str(tmp_path / spec)
    with pytest.raises(DataError, match="no such file|no files match") as err:
        expand_paths(target)
    assert target in str(err.value)


def test_empty_directory_and_unsupported_file_are_errors(tmp_path):
    with pytest.raises(DataError, match="holds no data files") as err:
        expand_paths(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    txt = write_bytes(tmp_path / "notes.txt", b"hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'") as err:
        expand_paths(txt)
    assert "notes.txt" in str(err.value)


def test_missing_column_names_the_column_and_the_columns_found(tmp_path):
    path = write_bytes(tmp_path / "nolabel.csv", b"ID,text,sentiment\n1,hi,Positive\n")
    with pytest.raises(DataError) as err:
        load_labelled(path, cfg(), LABELS)
    msg = str(err.value)
    assert path in msg
    assert "'sentence'" in msg
    assert "'label'" in msg
    assert "['ID', 'text', 'sentiment']" in msg
    # ... and configuring the names fixes it.
    loaded = load_labelled(path, cfg(text_column="text", label_column="sentiment"), LABELS)
    assert loaded.table.column("sentence").to_pylist() == ["hi"]


def test_label_map_with_int_labels_parquet_jsonl_and_csv(tmp_path):
    imdb = cfg(label_map={"0": "Negative", "1": "Positive"}, text_column="text")
    pq.write_table(pa.table({"text": ["bad film", "good film"], "label": pa.array([0, 1], pa.int64())}), tmp_path / "i.parquet")
    write_jsonl(tmp_path / "i.jsonl", [{"text": "bad film", "label": 0}, {"text": "good film", "label": 1}])
    write_bytes(tmp_path / "i.csv", b"text,label\nbad film,0\ngood film,1\n")
    for name in ("i.parquet", "i.jsonl", "i.csv"):
        table = load_labelled(str(tmp_path / name), imdb, LABELS).table
        assert table.column("label").to_pylist() == ["Negative", "Positive"], name
        assert "ID" not in table.column_names
        assert "lang" not in table.column_names


# ----------------------------------------------------------------------------- bad rows: error mode

BAD_CASES = {
    # name: (file name, bytes, expected row, expected line or None, reason regex)
    "empty text": ("e.csv", HEADER + b"1,ok,Positive,en\n2,,Negative,en\n", 2, 3, r"empty text"),
    "whitespace text": ("w.csv", HEADER + b'1,ok,Positive,en\n2,"  \t ",Negative,en\n', 2, 3, r"empty text \(whitespace only\)"),
    "undecodable csv": ("u.csv", HEADER + b"1,ok,Positive,en\n2,caf\xe9 bad,Negative,en\n", 2, 3, r"undecodable bytes .*byte 3"),
    "unknown label": (
        "l.csv",
        HEADER + b"1,ok,Positive,en\n2,meh,Neutral,en\n",
        2,
        3,
        r"unknown label \('Neutral'; expected one of Positive, Negative",
    ),
    "missing label csv": ("m.csv", HEADER + b"1,ok,Positive,en\n2,text,,en\n", 2, 3, r"missing label"),
    "duplicate id": ("d.csv", HEADER + b"1,ok,Positive,en\n1,again,Negative,en\n", 2, 3, r"duplicate ID \('1', first at row 1\)"),
    "missing id": ("i.csv", HEADER + b"1,ok,Positive,en\n,no id,Negative,en\n", 2, 3, r"missing ID"),
    "short csv row": (
        "s.csv",
        HEADER + b"1,ok,Positive,en\n2,short\n",
        2,
        3,
        r"malformed row \(has 2 fields, the header has 4\)",
    ),
    # A quoted newline in row 1 shifts row 2 to line 4: the line is counted, not derived.
    "line after multiline": ("n.csv", HEADER + b'1,"two\nlines",Positive,en\n2,x,Bad,en\n', 2, 4, r"unknown label"),
    "null text jsonl": (
        "t.jsonl",
        b'{"sentence":"ok","label":"Positive"}\n{"sentence":null,"label":"Negative"}\n',
        2,
        2,
        r"missing text \(null\)",
    ),
    "number text jsonl": (
        "n.jsonl",
        b'{"sentence":"ok","label":"Positive"}\n{"sentence":42,"label":"Negative"}\n',
        2,
        2,
        r"text is not a string \(got int 42\)",
    ),
    "null label jsonl": (
        "l.jsonl",
        b'{"sentence":"ok","label":"Positive"}\n{"sentence":"x","label":null}\n',
        2,
        2,
        r"missing label",
    ),
    "undecodable jsonl": (
        "u.jsonl",
        b'{"sentence":"ok","label":"Positive"}\n{"sentence":"caf\xe9","label":"Negative"}\n',
        2,
        2,
        r"undecodable bytes",
    ),
    "invalid json": (
        "j.jsonl",
        b'{"sentence":"ok","label":"Positive"}\n{"sentence": "x", label}\n',
        2,
        2,
        r"malformed row \(invalid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_row_kind_errors_naming_file_row_and_reason(tmp_path, case):
    name, data, row, line, reason = BAD_CASES[case]
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(DataError) as err:
        load_labelled(path, cfg(on_bad_rows="error"), LABELS)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row {row}")
    if line is not None:
        assert f"(line {line})" in msg
    assert re.search(reason, msg), msg
    assert "data.on_bad_rows=skip" in msg


def test_parquet_bad_rows_name_the_row(tmp_path):
    table = pa.table({"sentence": ["fine", None, "  "], "label": ["Positive", "Negative", "Positive"]})
    path = str(tmp_path / "p.parquet")
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"p\.parquet: row 2: missing text \(null\)"):
        load_labelled(path, cfg(), LABELS)
    binary = pa.table({"sentence": pa.array([b"ok", b"caf\xe9"], pa.binary()), "label": ["Positive", "Negative"]})
    pq.write_table(binary, path)
    with pytest.raises(DataError, match=r"p\.parquet: row 2: undecodable bytes"):
        load_labelled(path, cfg(), LABELS)


def test_duplicate_ids_are_caught_across_files(tmp_path):
    write_bytes(tmp_path / "a.csv", HEADER + b"1,ok,Positive,en\n")
    write_bytes(tmp_path / "b.csv", HEADER + b"2,ok,Positive,en\n1,again,Negative,en\n")
    with pytest.raises(DataError) as err:
        load_labelled(str(tmp_path / "*.csv"), cfg(), LABELS)
    assert str(err.value).startswith(
        f"{tmp_path / 'b.csv'}: row 2 (line 3): duplicate ID ('1', first at {tmp_path / 'a.csv'}: row 1)"
    )


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_empty_file_header_only_and_all_bad_are_errors_in_both_modes(tmp_path, mode):
    quarantine = str(tmp_path / "q.jsonl")
    for name, data, expected in [
        ("zero.csv", b"", "empty file"),
        ("header.csv", HEADER, "no data rows"),
        ("zero.jsonl", b"", "no data rows|missing column"),
    ]:
        path = write_bytes(tmp_path / name, data)
        with pytest.raises(DataError, match=expected) as err:
            load_labelled(path, cfg(on_bad_rows=mode), LABELS, quarantine_path=quarantine)
        assert path in str(err.value)
    all_bad = write_bytes(tmp_path / "bad.csv", HEADER + b"1,,Positive,en\n2,x,Meh,en\n")
    with pytest.raises(DataError, match="row" if mode == "error" else r"none of the 2 rows is usable; 2 quarantined"):
        load_labelled(all_bad, cfg(on_bad_rows=mode), LABELS, quarantine_path=quarantine)


# ----------------------------------------------------------------------------- bad rows: skip mode


def test_skip_mode_quarantines_every_bad_row_and_keeps_every_good_row(tmp_path):
    rows = (
        HEADER
        + b"1,good one,Positive,en\n"
        + b"2,,Negative,en\n"  # empty text
        + b"3,caf\xe9,Negative,es\n"  # undecodable
        + b"4,fine,NEGATIVE,es\n"  # good (case)
        + b"5,hmm,Neutral,en\n"  # unknown label
        + b"6,no label,,en\n"  # missing label
        + b"4,dup id,Positive,zh\n"  # duplicate ID
        + b"7,short row\n"  # malformed
        + b'8,"multi\nline good",positive,zh\n'  # good (quoted newline)
        + b"9,   ,Positive,en\n"  # whitespace only
    )
    path = write_bytes(tmp_path / "mixed.csv", rows)
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    loaded = load_labelled(path, cfg(on_bad_rows="skip"), LABELS, quarantine_path=str(quarantine))

    assert loaded.table.column("ID").to_pylist() == ["1", "4", "8"]
    assert loaded.table.column("sentence").to_pylist() == ["good one", "fine", "multi\nline good"]
    assert loaded.table.column("label").to_pylist() == ["Positive", "Negative", "Positive"]
    assert loaded.table.column("source_row").to_pylist() == [1, 4, 9]

    entries = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert loaded.bad_rows.count == len(entries) == 7
    assert loaded.bad_rows.quarantine_path == str(quarantine)
    assert len(loaded) + loaded.bad_rows.count == 10  # nothing lost
    assert loaded.bad_rows.by_reason == {
        "empty text": 2,
        "undecodable bytes": 1,
        "unknown label": 1,
        "missing label": 1,
        "duplicate ID": 1,
        "malformed row": 1,
    }
    by_row = {e["row"]: e for e in entries}
    assert sorted(by_row) == [2, 3, 5, 6, 7, 8, 10]
    assert all(e["file"] == path for e in entries)
    assert by_row[3]["values"]["sentence"] == "caf\\xe9"  # raw bytes shown, not lost
    assert by_row[5]["values"]["label"] == "Neutral"
    assert by_row[5]["reason"].startswith("unknown label")
    assert by_row[7]["values"]["ID"] == "4"
    assert "first at row 4" in by_row[7]["reason"]
    assert by_row[8]["values"]["_raw"] == ["7", "short row"]
    assert by_row[10]["line"] == 12  # after the two-line record


def test_skip_mode_jsonl_quarantines_undecodable_and_invalid_lines(tmp_path):
    data = (
        b'{"sentence":"ok","label":"Positive"}\n'
        b'{"sentence":"caf\xe9","label":"Negative"}\n'
        b"not json\n"
        b'{"sentence":3.5,"label":"Negative"}\n'
        b'["a list"]\n'
        b'{"sentence":"also ok","label":"negative"}\n'
    )
    path = write_bytes(tmp_path / "x.jsonl", data)
    quarantine = tmp_path / "q.jsonl"
    loaded = load_labelled(path, cfg(on_bad_rows="skip"), LABELS, quarantine_path=str(quarantine))
    assert loaded.table.column("sentence").to_pylist() == ["ok", "also ok"]
    assert loaded.bad_rows.by_reason == {"undecodable bytes": 1, "malformed row": 2, "text is not a string": 1}
    entries = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert [e["row"] for e in entries] == [2, 3, 4, 5]
    assert entries[0]["values"]["_raw"] == '{"sentence":"caf\\xe9","label":"Negative"}'
    assert entries[1]["values"]["_raw"] == "not json"


def test_skip_mode_needs_a_quarantine_path(tmp_path):
    with pytest.raises(DataError, match="quarantine path"):
        load_labelled(str(DEMO_CSV), cfg(on_bad_rows="skip"), LABELS)
    # the config's path is used when none is passed
    target = tmp_path / "cfg-q.jsonl"
    loaded = load_labelled(str(DEMO_CSV), cfg(on_bad_rows="skip", quarantine_path=str(target)), LABELS)
    assert loaded.bad_rows.count == 0
    assert target.exists()
    assert target.read_text() == ""


# ----------------------------------------------------------------------------- per-row helpers


@pytest.mark.parametrize(
    "value, kind",
    [
        ("fine", None),
        (b"fine", None),
        ("", "empty text"),
        (" \n\t", "empty text (whitespace only)"),
        (None, "missing text (null)"),
        (float("nan"), "missing text (null)"),
        (7, "text is not a string (got int 7)"),
        (b"caf\xe9", "undecodable bytes"),
        ("caf\udce9", "undecodable bytes"),  # a CSV byte carried as a surrogate escape
    ],
)
def test_text_problem(value, kind):
    problem = text_problem(value)
    if kind is None:
        assert problem is None
    else:
        assert problem is not None, problem
        assert problem.startswith(kind), problem


def test_the_id_index_finds_repeats_across_batches_and_files_and_leaves_no_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with IdIndex() as ids:
        assert list(tmp_path.iterdir()) == []  # unlinked as soon as it is open
        assert ids.add("in.csv", 1, ["a", "b", None]) == []
        [dup] = ids.add("in.csv", 3, ["c", "d", "a"])
        assert (dup.id, dup.row, dup.first_row) == ("a", 5, 1)
        assert dup.reason() == "duplicate ID ('a', first at row 1)"
        [again] = ids.add("other.csv", 1, ["b", "e", "e"])[:1]
        assert again.reason() == "duplicate ID ('b', first at in.csv: row 2)"
        assert [d.row for d in ids.add("other.csv", 4, ["f", "f", "f"])] == [5, 6]
        assert ids.count == 6  # a b c d e f


def test_a_column_that_mixes_value_types_is_one_line_naming_it(tmp_path):
    from sentiment_ray.io.rows import RowRules, RowValidator

    mixed = write_bytes(tmp_path / "m.jsonl", b'{"ID": "1", "sentence": "x", "a": "x"}\n{"ID": "2", "sentence": "y", "a": 1}\n')
    [chunk] = list(io_readers.read_chunks(mixed))
    checked = RowValidator(RowRules(text_column="sentence", id_column="ID")).validate(chunk, has_ids=True)
    with pytest.raises(DataError, match=r"m\.jsonl: rows 1-2: column 'a' mixes value types"):
        checked.table("ID")


# ----------------------------------------------------------------------------- splits


def _keys(table: pa.Table) -> list[str]:
    return table.column("ID").to_pylist()


def test_split_is_deterministic_disjoint_and_complete(demo):
    train, val = split_train_validation(demo, 0.125, seed=42)
    again_train, again_val = split_train_validation(demo, 0.125, seed=42)
    assert _keys(train) == _keys(again_train)
    assert _keys(val) == _keys(again_val)
    assert not set(_keys(train)) & set(_keys(val))
    assert sorted(_keys(train) + _keys(val)) == sorted(_keys(demo))
    assert train.schema == demo.schema
    other_train, other_val = split_train_validation(demo, 0.125, seed=7)
    assert set(_keys(other_val)) != set(_keys(val))
    assert abs(val.num_rows - 500) <= 8  # rounding per stratum


def test_split_is_stratified_by_label_and_lang(demo):
    train, val = split_train_validation(demo, 0.125, seed=1)
    whole = Counter(zip(demo.column("label").to_pylist(), demo.column("lang").to_pylist()))
    held = Counter(zip(val.column("label").to_pylist(), val.column("lang").to_pylist()))
    for stratum, n in whole.items():
        assert held[stratum] == max(1, int(0.125 * n + 0.5)) if n >= 2 else held[stratum] == 0, stratum
    for column in ("label", "lang"):
        totals, in_val = Counter(demo.column(column).to_pylist()), Counter(val.column(column).to_pylist())
        for value, n in totals.items():
            assert abs(in_val[value] / n - 0.125) < 0.02, (column, value)


def test_split_small_strata_and_zero_fraction():
    table = pa.table({"label": ["P", "P", "N", "N", "N", "X"], "ID": list("abcdef")})
    train, val = split_train_validation(table, 0.1, seed=0)
    # 2-row and 3-row strata give 1 each (at least one); the singleton stays in training
    assert Counter(val.column("label").to_pylist()) == {"P": 1, "N": 1}
    assert "f" in _keys(train)
    train, val = split_train_validation(table, 0.0, seed=0)
    assert val.num_rows == 0
    assert train.equals(table)
    assert val.schema == table.schema
    with pytest.raises(ValueError, match="fraction"):
        split_train_validation(table, 1.0, seed=0)


def test_stratified_subsample_and_row_limits(demo):
    sample = stratified_subsample(demo, 400, seed=3)
    assert sample.num_rows == 400
    assert _keys(sample) == _keys(stratified_subsample(demo, 400, seed=3))
    assert set(_keys(sample)) <= set(_keys(demo))
    whole, part = Counter(demo.column("lang").to_pylist()), Counter(sample.column("lang").to_pylist())
    for lang, n in whole.items():
        assert abs(part[lang] - 400 * n / demo.num_rows) <= 1.5, lang
    assert stratified_subsample(demo, None, seed=3) is demo
    assert stratified_subsample(demo, 10_000, seed=3) is demo
    train, val = split_train_validation(demo, 0.125, seed=42)
    limited_train, limited_val = apply_row_limits(train, val, cfg(max_train_rows=300, max_validation_rows=50))
    assert (limited_train.num_rows, limited_val.num_rows) == (300, 50)
    assert set(_keys(limited_val)) <= set(_keys(val))


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_bytes_and_names_not_directories(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    shutil.copy(DEMO_CSV, a / "data.csv")
    original = fingerprint([str(a / "data.csv")])
    assert original == fingerprint(str(a))  # directory expands to the same file
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(DEMO_CSV, b / "data.csv")
    assert fingerprint([str(b / "data.csv")]) == original  # same content elsewhere
    (b / "data.csv").rename(b / "renamed.csv")
    assert fingerprint([str(b / "renamed.csv")]) != original
    data = bytearray((a / "data.csv").read_bytes())
    data[1000] ^= 1
    (a / "data.csv").write_bytes(bytes(data))
    assert fingerprint([str(a / "data.csv")]) != original
    assert len(original) == 64


def test_remote_uri_glob_lists_and_reads_through_the_filesystem(tmp_path, monkeypatch, demo_small_table):
    """The non-local branch (s3://, gs://): a SubTreeFileSystem over tmp_path stands in for a bucket."""
    from pyarrow import fs as pafs

    (tmp_path / "bucket" / "train" / "sub").mkdir(parents=True)
    pq.write_table(demo_small_table.slice(0, 50), tmp_path / "bucket" / "train" / "a.parquet")
    pq.write_table(demo_small_table.slice(50, 50), tmp_path / "bucket" / "train" / "b.parquet")
    pq.write_table(demo_small_table.slice(100, 50), tmp_path / "bucket" / "train" / "sub" / "c.parquet")
    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())

    def fake_filesystem(path):
        assert path.startswith("s3://")
        return bucket, path[len("s3://") :]

    monkeypatch.setattr(io_files, "data_filesystem", fake_filesystem)
    monkeypatch.setattr(io_readers, "data_filesystem", fake_filesystem)
    # '*' stays within one directory level, as in a shell
    assert expand_paths("s3://bucket/train/*.parquet") == ["s3://bucket/train/a.parquet", "s3://bucket/train/b.parquet"]
    assert expand_paths("s3://bucket/train")[-1] == "s3://bucket/train/sub/c.parquet"
    loaded = load_labelled("s3://bucket/train/*.parquet", cfg(), LABELS)
    assert loaded.table.column("ID").to_pylist() == demo_small_table.column("ID").to_pylist()[:100]
    assert fingerprint("s3://bucket/train/*.parquet") != fingerprint("s3://bucket/train")
    with pytest.raises(DataError, match="s3://bucket/nope/\\*.csv: no files match"):
        expand_paths("s3://bucket/nope/*.csv")
