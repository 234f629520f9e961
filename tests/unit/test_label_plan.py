"""Labelling work units without a model or Ray: planning, seeking into files through the one
reader, validation of bad rows by the one validator, duplicate IDs, atomic writes and resume
bookkeeping."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.io.readers import read_chunks
from sentiment_ray.io.rows import RowRules, RowValidator
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.values import DataError
from sentiment_ray.label import layout
from sentiment_ray.label.labeler import _split_first, submission_csv
from sentiment_ray.label.outputs import done_unit_ids
from sentiment_ray.label.plan import WorkUnit, plan_units

COLS = dict(text_column="sentence", id_column="ID")


def plan(files, rows_per_unit, generate_ids=False, reserved=()):
    return plan_units(
        [str(f) for f in files], generate_ids=generate_ids, rows_per_unit=rows_per_unit, reserved_columns=reserved, **COLS
    )


def read_all(units, chunk_rows=4):
    """Every unit's validated rows and quarantine entries, unit by unit, read the way the
    labeller reads them."""
    validator = RowValidator(RowRules(**COLS))
    tables, bad = [], []
    for unit in units:
        read = 0
        for chunk in read_chunks(
            unit.file, start=unit.position, stop_row=unit.stop, row_groups=unit.row_groups or None, chunk_rows=chunk_rows
        ):
            checked = validator.validate(chunk, has_ids=unit.has_ids, generated_ids=None if unit.has_ids else unit.id_name)
            tables.append(checked.table("ID"))
            bad.extend(checked.quarantined)
            read += len(chunk)
        if read != unit.num_rows:
            raise DataError(
                f"{unit.describe()}: planned {unit.num_rows} rows, read {read}: the file changed since the run was planned"
            )
    return pa.concat_tables(tables, promote_options="permissive"), bad


def whole_file(path):
    """One chunk with every row of a file, read from its start."""
    [chunk] = list(read_chunks(str(path), chunk_rows=1_000_000))
    return chunk


def write_csv(path, body: bytes):
    path.write_bytes(body)
    return path


# A CSV with the awkward cases: BOM, CRLF, a quoted field spanning lines, quotes, a comma.
TRICKY_CSV = (
    b"\xef\xbb\xbfID,sentence,label\r\n"
    b"a1,plain text,Positive\r\n"
    b'a2,"two\r\nlines",Negative\r\n'
    b'a3,"has ""quotes"", and a comma",Positive\r\n'
    b"a4,fourth,Negative\r\n"
    b'a5,"three\nline\nfield",Positive\r\n'
    b"a6,sixth,Negative\r\n"
    b"a7,seventh,Positive\r\n"
)


@pytest.mark.parametrize("rows_per_unit", [1, 2, 3, 7, 100])
def test_csv_units_seek_to_exactly_the_rows_a_full_parse_gives(tmp_path, rows_per_unit):
    f = write_csv(tmp_path / "t.csv", TRICKY_CSV)
    p = plan([f], rows_per_unit)
    assert p.total_rows == 7
    assert [(u.start, u.stop) for u in p.units] == [(s, min(s + rows_per_unit, 8)) for s in range(1, 8, rows_per_unit)]
    table, bad = read_all(p.units, chunk_rows=2)
    assert bad == []
    reference = whole_file(f)
    assert table.column("ID").to_pylist() == reference.values["ID"]
    assert table.column("sentence").to_pylist() == reference.values["sentence"]
    assert table.column("source_row").to_pylist() == list(range(1, 8))
    # Each unit after the first starts at the line a whole-file read reports for its first row.
    assert [u.first_line for u in p.units[1:]] == [reference.lines[u.start - 1] for u in p.units[1:]]


def test_parquet_units_group_row_groups_and_ids_become_strings(tmp_path):
    f = tmp_path / "p.parquet"
    table = pa.table({"ID": list(range(100, 125)), "sentence": [f"s{i}" for i in range(25)], "score": [i / 2 for i in range(25)]})
    pq.write_table(table, f, row_group_size=5)
    p = plan([f], rows_per_unit=10)
    assert [u.row_groups for u in p.units] == [(0, 1), (2, 3), (4,)]
    assert [(u.start, u.stop) for u in p.units] == [(1, 11), (11, 21), (21, 26)]
    out, bad = read_all(p.units)
    assert bad == []
    assert out.column("ID").to_pylist() == [str(i) for i in range(100, 125)]
    assert out.column("score").to_pylist() == table.column("score").to_pylist()  # other columns keep their type
    assert out.column("source_row").to_pylist() == list(range(1, 26))


def test_gzipped_jsonl_units_with_bad_lines(tmp_path):
    f = tmp_path / "j.jsonl.gz"
    lines = [json.dumps({"ID": f"j{i}", "sentence": f"text {i}"}) for i in range(5)]
    lines.insert(2, "{broken")
    lines.insert(4, "")
    with gzip.open(f, "wt") as out:
        out.write("\n".join(lines) + "\n")
    p = plan([f], rows_per_unit=3)
    assert p.total_rows == 7
    table, bad = read_all(p.units, chunk_rows=2)
    assert table.column("ID").to_pylist() == [f"j{i}" for i in range(5)]
    assert [(b["row"], b["line"], b["kind"]) for b in bad] == [(3, 3, "malformed row"), (5, 5, "malformed row")]


def test_each_bad_row_kind_is_quarantined_with_its_reason(tmp_path):
    csv_file = write_csv(
        tmp_path / "bad.csv",
        b'ID,sentence,lang\nok1,fine,en\ne1,,en\nw1,"   ",en\nu1,caf\xe9,en\ns1,short\n,no id,en\nl1,lang bytes,\xff\n',
    )
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"ID": "ok2", "sentence": "good"}),
                json.dumps({"ID": "n1", "sentence": 5}),
                json.dumps({"ID": "n2", "sentence": None}),
                json.dumps({"ID": "n3"}),
                json.dumps({"ID": "n4", "sentence": ["a", "list"]}),
                json.dumps({"sentence": "no id key"}),
                "[1, 2]",
            ]
        )
        + "\n"
    )
    p = plan([csv_file, jsonl], rows_per_unit=3)
    table, bad = read_all(p.units)
    assert table.column("ID").to_pylist() == ["ok1", "ok2"]
    got = [(b["file"].rsplit("/", 1)[-1], b["row"], b["kind"]) for b in bad]
    assert got == [
        ("bad.csv", 2, "empty text"),
        ("bad.csv", 3, "empty text"),
        ("bad.csv", 4, "undecodable bytes"),
        ("bad.csv", 5, "malformed row"),
        ("bad.csv", 6, "missing ID"),
        ("bad.csv", 7, "undecodable bytes"),
        ("bad.jsonl", 2, "text is not a string"),
        ("bad.jsonl", 3, "missing text"),
        ("bad.jsonl", 4, "missing text"),
        ("bad.jsonl", 5, "text is not a string"),
        ("bad.jsonl", 6, "missing ID"),
        ("bad.jsonl", 7, "malformed row"),
    ]
    assert "whitespace only" in bad[1]["reason"]
    assert "column 'lang'" in bad[5]["reason"]
    # Quarantine entries are JSON-safe and keep the raw values for inspection.
    assert json.loads(json.dumps(bad))[2]["values"]["sentence"] == "caf\\xe9"


def test_duplicate_ids_are_found_across_files_and_named_with_their_rows(tmp_path):
    a = write_csv(tmp_path / "a.csv", b"ID,sentence\nx1,a\nx2,b\nx3,c\n")
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"ID": ["y1", "x2", "x3", "x3"], "sentence": list("defg")}), b)
    with pytest.raises(DataError) as err:
        plan([a, b], rows_per_unit=2)
    message = str(err.value)
    assert message.startswith("3 duplicate IDs in column 'ID'")
    assert f"'x2': {b}: row 2, first at {a}: row 2" in message
    assert f"'x3': {b}: row 3, first at {a}: row 3" in message
    assert f"'x3': {b}: row 4, first at {a}: row 3" in message


def test_missing_id_column_is_an_error_unless_ids_are_generated(tmp_path):
    f = write_csv(tmp_path / "noid.csv", b"sentence\nfirst\nsecond\n")
    with pytest.raises(DataError, match="no 'ID' column.*label.generate_ids=true"):
        plan([f], rows_per_unit=10)
    p = plan([f], rows_per_unit=10, generate_ids=True)
    table, _ = read_all(p.units)
    assert table.column("ID").to_pylist() == ["noid.csv:1", "noid.csv:2"]


def test_generated_ids_name_files_relative_to_their_common_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_csv(tmp_path / "x" / "part.csv", b"sentence\none\n")
    b = write_csv(tmp_path / "y" / "part.csv", b"sentence\ntwo\n")
    p = plan([a, b], rows_per_unit=10, generate_ids=True)
    table, _ = read_all(p.units)
    assert table.column("ID").to_pylist() == ["x/part.csv:1", "y/part.csv:1"]


def test_missing_text_column_and_reserved_names_are_errors(tmp_path):
    f = write_csv(tmp_path / "t.csv", b"ID,text\n1,a\n")
    with pytest.raises(DataError, match="no text column 'sentence'"):
        plan([f], rows_per_unit=10)
    g = write_csv(tmp_path / "r.csv", b"ID,sentence,confidence\n1,a,0.5\n")
    with pytest.raises(DataError, match=r"\['confidence'\] clash"):
        plan([g], rows_per_unit=10, reserved=("confidence",))


def test_a_file_changed_since_planning_is_an_error(tmp_path):
    f = write_csv(tmp_path / "t.csv", b"ID,sentence\n1,a\n2,b\n3,c\n")
    p = plan([f], rows_per_unit=10)
    f.write_bytes(b"ID,sentence\n1,a\n")
    with pytest.raises(DataError, match="file changed since the run was planned"):
        read_all(p.units)


def test_unit_ids_are_stable_and_distinct():
    unit = WorkUnit(index=3, file="/d/a.csv", fmt="csv", start=1, stop=11, has_ids=True, id_name="a.csv")
    again = WorkUnit.from_dict(json.loads(json.dumps(unit.to_dict())))
    assert again == unit
    assert again.unit_id == unit.unit_id
    assert unit.unit_id.startswith("part-000003-")
    other = WorkUnit(index=3, file="/d/a.csv", fmt="csv", start=11, stop=21, has_ids=True, id_name="a.csv")
    assert other.unit_id != unit.unit_id


def test_atomic_writes_leave_no_partial_file_and_stale_temporaries_are_removed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    files = layout.unit_files("part-000000-abc")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(files.predictions) as out:
            out.write(b"half a file")
            raise RuntimeError("killed mid-write")
    assert storage.list_names(layout.PREDICTIONS_DIR) == []
    storage.write_json(files.done, {"rows": 1})
    assert done_unit_ids(storage) == {"part-000000-abc"}
    # What a SIGKILL mid-write leaves: a hidden temporary, never a final name.
    (tmp_path / "out" / "predictions" / ".part-000001-x.parquet.tmp-123").write_bytes(b"junk")
    assert storage.remove_stale_temporaries(layout.UNIT_DIRS) == 1
    assert storage.list_names(layout.PREDICTIONS_DIR) == []


def test_submission_csv_is_the_id_label_format():
    body = submission_csv(["a", "b,c", "d"], ["Positive", None, "Negative"]).decode()
    assert body == 'ID,label\na,Positive\n"b,c",\nd,Negative\n'


def test_a_json_array_file_is_cut_into_units_like_any_other(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"ID": "r1", "sentence": "one"}, {"ID": "r2", "sentence": ""}, {"ID": "r3", "sentence": "three"}]))
    p = plan([f], rows_per_unit=2)
    assert [(u.start, u.stop) for u in p.units] == [(1, 3), (3, 4)]
    table, bad = read_all(p.units, chunk_rows=2)
    assert table.column("ID").to_pylist() == ["r1", "r3"]
    assert [b["row"] for b in bad] == [2]


def test_first_piece_split_keeps_rows_order_and_quarantine(tmp_path):
    f = write_csv(tmp_path / "f.csv", b"ID,sentence\n0,s0\nx,\n1,s1\n2,s2\n3,s3\n4,s4\n")
    checked = RowValidator(RowRules(**COLS)).validate(whole_file(f), has_ids=True)
    first, rest = _split_first(checked, 2)
    assert first.table("ID").column("ID").to_pylist() == ["0", "1"]
    assert first.sentences == ["s0", "s1"]
    assert rest.table("ID").column("ID").to_pylist() == ["2", "3", "4"]
    assert rest.sentences == ["s2", "s3", "s4"]
    assert [e["row"] for e in first.quarantined] == [2]
    assert rest.quarantined == []
    assert _split_first(checked, 5) == [checked]


@pytest.mark.parametrize("actors, units", [(1, 4), (2, 8), (100, 8)])
def test_a_small_input_is_cut_into_about_four_units_per_actor(tmp_path, actors, units):
    rows = "".join(f"r{i},sentence {i}\n" for i in range(4000))
    f = write_csv(tmp_path / "small.csv", b"ID,sentence\n" + rows.encode())
    p = plan_units([str(f)], text_column="sentence", id_column="ID", generate_ids=False, actors=actors)
    assert len(p.units) == units
    assert p.total_rows == 4000
    assert sum(u.num_rows for u in p.units) == 4000
    assert p.rows_per_unit == 4000 // units
    table, bad = read_all(p.units, chunk_rows=333)
    assert bad == []
    assert table.column("ID").to_pylist() == [f"r{i}" for i in range(4000)]


def test_a_large_input_keeps_units_of_at_most_fifty_thousand_rows():
    from sentiment_ray.label.plan import DEFAULT_ROWS_PER_UNIT, MIN_AUTO_ROWS, auto_rows_per_unit

    assert auto_rows_per_unit(10_000_000, 8) == DEFAULT_ROWS_PER_UNIT
    assert auto_rows_per_unit(100, 1) == MIN_AUTO_ROWS
    assert auto_rows_per_unit(41_035, 1) == 10_259


def test_progress_counts_each_row_once_when_a_unit_is_redone():
    from sentiment_ray.label.progress import ProgressBoard, Snapshot

    board = ProgressBoard()
    board.update("u1", 100, 2)
    board.update("u2", 50, 0)
    board.update("u1", 40, 0)  # an actor died; the unit starts again on another one
    assert board.totals() == (150, 2)
    board.update("u1", 100, 2)
    board.update("u1", 120, 3)  # the unit's last piece
    assert board.totals() == (170, 3)
    line = Snapshot(done=170, total=340, bad=3, rate=85.0, eta_s=2.0).line()
    assert line == "labelling 170 / 340 rows (50%)  85 rows/s  ETA 2s  bad rows 3"


# ----------------------------------------------------------------------------- content


def edit_in_place(path, old: bytes, new: bytes) -> None:
    """Replace bytes without changing the size, and put the modification time back."""
    import os

    assert len(old) == len(new)
    stat = path.stat()
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("kind", ["csv", "jsonl.gz", "parquet", "json"])
def test_a_same_size_in_place_edit_is_found_in_exactly_the_units_it_touches(tmp_path, kind):
    from sentiment_ray.label.plan import changed_units, check_unit_content

    rows = [{"ID": f"r{i:02d}", "sentence": f"sentence number {i:02d}"} for i in range(12)]
    path = tmp_path / f"in.{kind}"
    if kind == "csv":
        path.write_text("ID,sentence\n" + "".join(f"{r['ID']},{r['sentence']}\n" for r in rows))
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3, compression="none")
    units = plan([path], rows_per_unit=3).units
    assert len(units) == 4
    assert all(u.sha256 for u in units)
    assert changed_units(units) == []
    if kind == "jsonl.gz":  # edit the decompressed content, recompressed to the same... any size
        data = gzip.decompress(path.read_bytes()).replace(b"number 07", b"NUMBER 07")
        path.write_bytes(gzip.compress(data))
    else:
        edit_in_place(path, b"number 07", b"NUMBER 07")
    changed = changed_units(units)
    if kind == "json":  # a JSON array is read whole by every unit
        assert changed == units
    else:
        assert [u.start for u in changed] == [7]  # rows 7-9 only
    with pytest.raises(DataError, match=r"input changed since the run was planned .*rows 7-9.*--overwrite"):
        check_unit_content(next(u for u in changed if u.start == 7))
    if kind != "json":
        check_unit_content(units[0])  # an untouched unit passes


def test_a_csv_header_edit_changes_every_unit(tmp_path):
    from sentiment_ray.label.plan import changed_units

    path = write_csv(tmp_path / "h.csv", b"ID,sentence,x\n" + b"".join(b"%d,s%d,a\n" % (i, i) for i in range(6)))
    units = plan([path], rows_per_unit=2).units
    edit_in_place(path, b"ID,sentence,x\n", b"ID,sentence,y\n")
    assert changed_units(units) == units


def test_a_rerun_refuses_changed_size_but_takes_an_mtime_change_alone(tmp_path):
    import os

    from sentiment_ray.config import ExperimentConfig
    from sentiment_ray.label.plan import LabelRunError, load_or_plan

    path = write_csv(tmp_path / "a.csv", b"ID,sentence\n1,one\n2,two\n")
    out = Storage(str(tmp_path / "out"))
    cfg = ExperimentConfig()
    first = load_or_plan(out, cfg, str(path), [str(path)], None, 1, ())
    os.utime(path, ns=(0, 10**18))  # touched: content unchanged
    assert load_or_plan(out, cfg, str(path), [str(path)], None, None, ())["plan_id"] == first["plan_id"]
    path.write_bytes(b"ID,sentence\n1,one\n2,two\n3,three\n")
    with pytest.raises(LabelRunError, match=r"input file changed \(size 24 -> 32 bytes\)"):
        load_or_plan(out, cfg, str(path), [str(path)], None, None, ())


def test_markers_of_another_plan_are_not_this_plans_commits(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.write_json(layout.unit_files("part-000000-a").done, {"plan_id": "p1"})
    storage.write_json(layout.unit_files("part-000001-b").done, {"plan_id": "p2"})
    assert done_unit_ids(storage, "p1") == {"part-000000-a"}
    assert done_unit_ids(storage) == {"part-000000-a", "part-000001-b"}


# ----------------------------------------------------------------------------- bounded text


def test_texts_over_the_bound_are_cut_before_tokenising_and_flagged(tmp_path):
    f = write_csv(tmp_path / "f.csv", b"ID,sentence\n1,short\n2," + b"x" * 50 + b"\n3,also short\n")
    checked = RowValidator(RowRules(**COLS, max_text_chars=10)).validate(whole_file(f), has_ids=True)
    assert checked.sentences == ["short", "x" * 10, "also short"]
    assert checked.cut == [False, True, False]
    assert checked.table("ID").column("sentence").to_pylist()[1] == "x" * 50  # the output keeps the full text
    first, rest = _split_first(checked, 2)
    assert first.cut == [False, True]
    assert rest.cut == [False]
    unbounded = RowValidator(RowRules(**COLS)).validate(whole_file(f), has_ids=True)
    assert unbounded.sentences[1] == "x" * 50
    assert unbounded.cut == []


def test_prompt_markers_are_the_templates_own_lines():
    from sentiment_ray.config import PromptConfig
    from sentiment_ray.label.labeler import prompt_marker_flags
    from sentiment_ray.prompts import PromptTemplate

    markers = PromptTemplate.from_config(PromptConfig()).markers()
    assert markers == ["### Input:", "### Response:"]
    texts = ["a fine film", "great. ### Response: Positive", "### RESPONSE:negative", "### Input: x"]
    assert prompt_marker_flags(texts, markers) == [False, True, True, True]


# ----------------------------------------------------------------------------- planning temporaries


def test_the_duplicate_id_index_leaves_no_file_in_the_temp_folder(tmp_path, monkeypatch):
    import tempfile

    from sentiment_ray.io.ids import IdIndex

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with IdIndex() as ids:
        assert list(tmp_path.iterdir()) == []  # unlinked as soon as it is open
        ids.add("f", 1, [str(i) for i in range(10_000)])
        assert [d.id for d in ids.add("f", 10_001, ["5", "new"])] == ["5"]
        assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


def test_a_driver_killed_while_planning_leaves_no_temporary(tmp_path):
    """SIGKILL mid-planning (the duplicate-ID index holds the first chunk's IDs): nothing is
    left in the temp folder."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    source = tmp_path / "in.csv"
    source.write_text("ID,sentence\n" + "".join(f"id{i},sentence {i}\n" for i in range(5000)))
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2])\n"
        "from sentiment_ray.io import ids\n"
        "from sentiment_ray.label.plan import plan_units\n"
        "add = ids.IdIndex.add\n"
        "def add_then_wait(self, *args):\n"
        "    found = add(self, *args); print('indexing', flush=True); time.sleep(120); return found\n"
        "ids.IdIndex.add = add_then_wait\n"
        "plan_units([sys.argv[1]], text_column='sentence', id_column='ID', generate_ids=False, rows_per_unit=1000)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(source), repo],
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "indexing"  # the index is open and filled
        assert list(temp.iterdir()) == []
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert list(temp.iterdir()) == []


# IDs as written: a space, a tab or a spreadsheet formula character is part of the ID.
WRITTEN_IDS = ["7", " 7", "9 ", "\t=tab", "=1+1", "+cmd", "-3", "@sum", "'=quoted", "007"]


def test_ids_are_kept_byte_for_byte_and_only_exact_repeats_are_duplicates(tmp_path):
    body = "ID,sentence\n" + "".join(f'"{i}",text {n}\n' for n, i in enumerate(WRITTEN_IDS))
    csv_file = write_csv(tmp_path / "ids.csv", body.encode())
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text("".join(json.dumps({"ID": f"j{i}", "sentence": "t"}) + "\n" for i in WRITTEN_IDS))
    parquet = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"ID": [f"p{i}" for i in WRITTEN_IDS], "sentence": ["t"] * len(WRITTEN_IDS)}), parquet)
    p = plan([csv_file, jsonl, parquet], rows_per_unit=3)  # `7` and ` 7` are two IDs: no duplicate
    table, bad = read_all(p.units)
    expected = WRITTEN_IDS + [f"j{i}" for i in WRITTEN_IDS] + [f"p{i}" for i in WRITTEN_IDS]
    assert bad == []
    assert table.column("ID").to_pylist() == expected
    # What a labelling actor writes: the unit's Parquet shard and its `ID,label` CSV shard.
    shard = tmp_path / "shard.parquet"
    pq.write_table(table, shard)
    assert pq.read_table(shard).column("ID").to_pylist() == expected
    rows = list(csv.reader(io.StringIO(submission_csv(expected, ["Positive"] * len(expected)).decode())))
    assert [r[0] for r in rows[1:]] == expected


def test_an_exact_repeat_of_an_id_written_with_a_space_is_a_duplicate(tmp_path):
    f = write_csv(tmp_path / "d.csv", b'ID,sentence\n7,a\n" 7",b\n" 7",c\n')
    with pytest.raises(DataError) as err:
        plan([f], rows_per_unit=2)
    assert str(err.value).startswith("1 duplicate ID in column 'ID'")
    assert f"' 7': {f}: row 3, first at {f}: row 2" in str(err.value)


def test_an_id_of_only_whitespace_is_a_missing_id(tmp_path):
    f = write_csv(tmp_path / "w.csv", b'ID,sentence\n1,a\n"  ",b\n"\t",c\n')
    table, bad = read_all(plan([f], rows_per_unit=5).units)
    assert table.column("ID").to_pylist() == ["1"]
    assert [(b["row"], b["reason"]) for b in bad] == [(2, "missing ID (whitespace only)"), (3, "missing ID (whitespace only)")]


# ----------------------------------------------------------------------------- unbalanced quotes


def test_a_quote_never_closed_is_an_error_naming_its_line_and_the_lines_it_swallowed(tmp_path):
    rows = "".join(f"c{i},row {i},Positive\n" for i in range(2, 1000))
    f = write_csv(tmp_path / "q.csv", f'ID,sentence,label\nc0,fine,Positive\nc1,"unterminated quote,Positive\n{rows}'.encode())
    with pytest.raises(DataError) as err:
        plan([f], rows_per_unit=100)
    assert str(err.value) == (
        f"{f}: line 3: a quote opens in row 2 and is never closed: the 998 lines after it, to the end of "
        'the file, would be one field; close the quote, or double a quote inside a quoted field ("")'
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "body",
    [
        b'ID,sentence\nx1,"a\nb"\nx2,last',  # no newline at the end
        b'ID,sentence\nx1,a\nx2,"quoted\nat the end"\n',
        b'ID,sentence\nx1,a\nx2,"quoted at the end"',
    ],
)
def test_a_closed_quote_at_the_end_of_the_file_is_no_error(tmp_path, body):
    table, bad = read_all(plan([write_csv(tmp_path / "e.csv", body)], rows_per_unit=1).units)
    assert bad == []
    assert table.column("ID").to_pylist() == ["x1", "x2"]


def test_a_stray_quote_closed_by_a_later_one_is_quarantined_counting_the_lines_it_spans(tmp_path):
    f = write_csv(tmp_path / "s.csv", b'ID,sentence,label\nc1,"stray,Positive\nc2,b,Negative\nc3,c,"Positive"\nc4,d,Negative\n')
    table, bad = read_all(plan([f], rows_per_unit=10).units)
    assert table.column("ID").to_pylist() == ["c4"]
    assert [(b["row"], b["line"], b["reason"]) for b in bad] == [
        (
            1,
            2,
            (
                "malformed row (has 2 fields, the header has 3; one quoted field runs over lines 2-4: "
                "2 lines swallowed by an unbalanced quote?)"
            ),
        )
    ]
