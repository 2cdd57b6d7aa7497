"""Data metadata in a bounded pass, and the loader's limits: figures against
the loaded arrays and hand-written files, refusals before bytes are read,
messages that never quote a file's contents."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from core.data import DataError, DataLimits, load_arrays, load_dataset
from core.metadata import DataMetadata, describe
from core.spec import SpecError, parse_spec


def data_spec(**fields):
    return parse_spec({"data": {"shards": 2, **fields}, "training": {"steps": 1}, "resources": {"workers": 1}}).data


@pytest.mark.parametrize("name", ["digits", "iris", "wine", "breast_cancer"])
def test_builtin_metadata_matches_the_loaded_set(name):
    X, y, classes = load_arrays(data_spec(source=name), seed=0)
    assert describe(data_spec(source=name)) == DataMetadata(len(X), X.shape[1], classes, classes,
                                                             len(X) * (X.shape[1] + 1) * 8)


def test_synthetic_metadata_counts_the_teacher():
    meta = describe(data_spec(source="synthetic", samples=100, features=6, classes=4))
    # X 100x6, teacher 6x8 and 8x4, hidden 100x8 twice, scores 100x4, labels 100: 8 bytes each
    assert meta == DataMetadata(100, 6, 4, 4, (600 + 48 + 32 + 1600 + 400 + 100) * 8)


def test_csv_metadata_is_counted_by_streaming(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n" + "".join(f"{i},{2 * i},{i % 7}\n" for i in range(50)) + "\n")
    meta = describe(data_spec(source="d.csv"), [tmp_path])
    assert meta == DataMetadata(rows=50, n_features=2, n_classes=7, n_targets=7, bytes=50 * 3 * 8)
    (tmp_path / "r.csv").write_text("".join(f"{i},{i / 4}\n" for i in range(9)))
    assert describe(data_spec(source="r.csv"), [tmp_path]) == DataMetadata(9, 1, None, 1, 9 * 2 * 8)


def test_npz_metadata_agrees_with_the_loader(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", X=rng.standard_normal((40, 5)), y=np.arange(40, dtype=np.int16) % 3 + 2)
    np.savez_compressed(tmp_path / "r.npz", X=rng.standard_normal((30, 2)), y=rng.standard_normal((30, 4)))
    np.savez(tmp_path / "f.npz", X=np.ones((10, 2)), y=np.arange(10, dtype=np.float32))
    assert describe(data_spec(source="c.npz"), [tmp_path]) == DataMetadata(40, 5, 5, 5, 40 * 6 * 8)
    assert describe(data_spec(source="r.npz"), [tmp_path]) == DataMetadata(30, 2, None, 4, 30 * 6 * 8)
    assert describe(data_spec(source="f.npz"), [tmp_path]).n_classes == 10
    for name in ("c", "f"):  # streaming the labels in chunks finds what loading them does
        X, y, classes = load_arrays(data_spec(source=f"{name}.npz"), 0, [tmp_path])
        assert describe(data_spec(source=f"{name}.npz"), [tmp_path]).n_classes == classes


def test_an_inflating_npz_is_refused_before_it_is_decompressed(tmp_path):
    np.savez_compressed(tmp_path / "z.npz", X=np.zeros((60_000, 1000)), y=np.zeros(60_000))  # 480 MB inflated
    assert (tmp_path / "z.npz").stat().st_size < 1_000_000
    for read in (lambda: describe(data_spec(source="z.npz"), [tmp_path]),
                 lambda: load_dataset(data_spec(source="z.npz"), 0, data_roots=[tmp_path])):
        tracemalloc.start()
        with pytest.raises(DataError, match=r"array X inflates \d+x .* more than the limit of 100x \(max_inflation\)"):
            read()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 5_000_000, peak


def test_an_npz_member_past_the_data_limit_is_refused(tmp_path):
    np.savez(tmp_path / "s.npz", X=np.ones((2000, 100)), y=np.arange(2000) % 2)  # stored: no inflation
    limits = DataLimits(max_data_bytes=1_000_000)
    with pytest.raises(DataError, match="array X inflates to 1600128 bytes, more than the limit of 1000000"):
        load_dataset(data_spec(source="s.npz"), 0, data_roots=[tmp_path], limits=limits)
    # int8 arrays within the byte limit on disk are still refused by their float64 size
    np.savez(tmp_path / "i.npz", X=np.ones((2000, 100), np.int8), y=np.arange(2000, dtype=np.int8) % 2)
    with pytest.raises(DataError, match=r"2000 rows x 101 columns need 1616000 bytes as float64"):
        describe(data_spec(source="i.npz"), [tmp_path], limits)


def test_pickled_members_are_refused_from_their_header(tmp_path):
    np.savez(tmp_path / "p.npz", X=np.array([object()] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="pickled objects"):
        describe(data_spec(source="p.npz"), [tmp_path])


def test_a_very_wide_csv_line_is_refused_on_its_first_line(tmp_path):
    (tmp_path / "w.csv").write_text("1," * 2_000_000 + "0\n")  # 4 MB, one row
    limits = DataLimits(max_features=1000)
    for read in (lambda: describe(data_spec(source="w.csv"), [tmp_path], limits),
                 lambda: load_dataset(data_spec(source="w.csv"), 0, data_roots=[tmp_path], limits=limits)):
        tracemalloc.start()
        with pytest.raises(DataError, match=r"w\.csv: line 1 has more than 1001 columns, the limit is 1001"):
            read()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1_000_000, peak  # 1001 x 64 characters read, not the 4 MB line


@pytest.mark.parametrize("content, limits, message", [
    ("".join(f"{i},{i % 2}\n" for i in range(30)) + "1,2000000\n", DataLimits(), "2000001 classes, more than "
     "the limit of 100000 (max_classes)"),
    ("".join(f"{i},{i % 2}\n" for i in range(5000)), DataLimits(max_rows=4096),
     "5000 rows, more than the limit of 4096 (max_rows)"),
    ("1,2,3,0\n", DataLimits(max_features=2), "line 1 has 4 columns, more than the limit of 3 (max_features + 1)"),
])
def test_csv_limits_hold_in_both_passes(tmp_path, content, limits, message):
    (tmp_path / "d.csv").write_text(content)
    for read in (lambda: describe(data_spec(source="d.csv"), [tmp_path], limits),
                 lambda: load_dataset(data_spec(source="d.csv"), 0, data_roots=[tmp_path], limits=limits)):
        with pytest.raises(DataError, match=re.escape(message)):
            read()


SECRET = "hunter2-SECRET"


@pytest.mark.parametrize("content, label_column, message", [
    (f"a,b\n1,{SECRET}\n", None, "line 2, column 2: not a number"),
    (f"a,{SECRET}\n1,0\n2,1\n", "label", "is not a column of"),
    (f"{SECRET},1\n2\n", None, "line 2 has 1 columns, expected 2"),
    (f"x,y\n1,{SECRET}\n", None, "line 2, column 2: not a number"),
])
def test_csv_errors_never_quote_the_file(tmp_path, content, label_column, message):
    (tmp_path / "s.csv").write_text(content)
    fields = {"source": "s.csv"} if label_column is None else {"source": "s.csv", "label_column": label_column}
    for read in (lambda: describe(data_spec(**fields), [tmp_path]),
                 lambda: load_dataset(data_spec(**fields), 0, data_roots=[tmp_path])):
        with pytest.raises(DataError, match=message) as err:
            read()
        assert SECRET not in str(err.value)


def test_not_utf8_names_the_offset_not_the_bytes(tmp_path):
    (tmp_path / "b.csv").write_bytes(b"1,0\n2,\xff\xfe1\n")
    with pytest.raises(DataError, match="not UTF-8 text") as err:
        describe(data_spec(source="b.csv"), [tmp_path])
    assert "xff" not in str(err.value)


@pytest.mark.parametrize("source, message", [
    ("a\x00b.csv", "data.source: source must not contain control characters such as a NUL byte, got one at "
                   "position 1"),
    ("x" * 300 + ".csv", "data.source: source's file and folder names must be at most 255 bytes each, got one of 304"),
    ("a/" * 2100 + "b.csv", "data.source: source must be at most 4096 characters, got 4205"),
])
def test_unusable_file_names_are_refused_in_the_spec(source, message):
    with pytest.raises(SpecError) as err:
        data_spec(source=source)
    assert str(err.value) == message


def test_an_npz_whose_zip_directory_is_huge_is_refused_from_its_end_record(tmp_path):
    """Thousands of members make a directory past 64 KiB (an .npz of X and y
    needs a few hundred bytes): refused from the zip's end record, before
    the directory is read."""
    import zipfile

    path = tmp_path / "many.npz"
    np.savez(path, X=np.zeros((4, 2)), y=np.zeros(4))
    with zipfile.ZipFile(path, "a") as archive:
        for i in range(1500):
            archive.writestr(f"padding-{i:05d}-{'x' * 40}.npy", b"")
    directory = sum(46 + len(info.filename) for info in zipfile.ZipFile(path).infolist())
    assert directory > 64 * 1024
    with pytest.raises(DataError, match=rf"its zip directory is {directory} bytes, more than 65536"):
        load_arrays(parse_spec({"data": {"source": str(path)}, "training": {"steps": 1}}).data, 0, [str(tmp_path)])
    ok = tmp_path / "ok.npz"
    np.savez(ok, X=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    X, y, _ = load_arrays(parse_spec({"data": {"source": str(ok)}, "training": {"steps": 1}}).data, 0, [str(tmp_path)])
    assert X.shape == (4, 2) and y.shape == (4,)
