"""Manifest reading and validation (h2g.manifest)."""
from __future__ import annotations

from pathlib import Path

import pytest

from h2g.core.errors import ConfigError, ManifestError
from h2g.io.manifest import DEFAULT_MANIFEST, SlideRecord, load_manifest

HEADER = "slide_id,slide_path,annotation_path,grade,split,mpp\n"


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _write(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_good_manifest_resolves_paths_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    _touch(folder, "slides/a.tiff", "masks/a_mask.tiff", "slides/b.svs")
    absolute = tmp_path / "elsewhere" / "c.tiff"
    _touch(absolute.parent, absolute.name)
    path = _write(folder, HEADER
                  + "a,slides/a.tiff,masks/a_mask.tiff,1,train,\n"
                  + "b,slides/b.svs,,3,test,0.499\n"
                  + f"c,{absolute},,2,train,0.25\n")
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    manifest = load_manifest(Path("data/manifest.csv"))
    assert len(manifest) == 3
    assert [r.slide_id for r in manifest] == ["a", "b", "c"]
    a, b, c = manifest.records
    assert a == SlideRecord("a", Path("data/slides/a.tiff"), Path("data/masks/a_mask.tiff"),
                            1, "train", None)
    assert a.slide_path.resolve() == (folder / "slides/a.tiff").resolve()
    assert b.annotation_path is None and b.mpp == pytest.approx(0.499) and b.grade == 3
    assert c.slide_path == absolute
    assert [r.slide_id for r in manifest.split("train")] == ["a", "c"]
    assert manifest.split("val") == []
    assert path.is_file()


def test_mpp_column_is_optional(tmp_path):
    _touch(tmp_path, "a.tiff")
    path = _write(tmp_path, "slide_id,slide_path,annotation_path,grade,split\n"
                            "a,a.tiff,,2,val\n")
    (record,) = load_manifest(path).records
    assert record.mpp is None and record.split == "val"


def test_every_bad_row_is_reported_at_once(tmp_path):
    _touch(tmp_path, "ok.tiff", "ok_mask.tiff")
    rows = [
        "s1,ok.tiff,ok_mask.tiff,1,train,",        # 1: fine
        "s2,missing.tiff,ok_mask.tiff,2,val,",     # 2: slide file missing
        "s3,ok.tiff,gone_mask.tiff,3,test,",       # 3: annotation file missing
        "s1,ok.tiff,,1,train,",                    # 4: duplicate id
        "s5,ok.tiff,,4,train,",                    # 5: grade out of range
        "s6,ok.tiff,,two,train,",                  # 6: grade not a number
        "s7,ok.tiff,,1,training,",                 # 7: bad split
        "s8,ok.tiff,,1,test,-0.3",                 # 8: bad mpp
        ",ok.tiff,,1,test,",                       # 9: empty id
        "s10,,,0,dev,abc",                         # 10: empty path, grade, split, mpp
    ]
    path = _write(tmp_path, HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    error = info.value
    where = sorted((row, column) for _, row, column, _ in error.problems)
    assert where == sorted([
        (2, "slide_path"), (3, "annotation_path"), (4, "slide_id"), (5, "grade"),
        (6, "grade"), (7, "split"), (8, "mpp"), (9, "slide_id"),
        (10, "slide_path"), (10, "grade"), (10, "split"), (10, "mpp"),
    ])
    assert all(file == str(path) for file, _, _, _ in error.problems)
    problems = {(row, column): text for _, row, column, text in error.problems}
    assert "missing.tiff" in problems[(2, "slide_path")]
    assert "first on row 1" in problems[(4, "slide_id")]
    assert "'4'" in problems[(5, "grade")] and "'training'" in problems[(7, "split")]
    message = str(error)
    assert message.startswith(f"{path}: 12 problem(s)")
    assert "row 7, column 'split'" in message


def test_missing_columns_are_reported_with_the_other_rows_problems(tmp_path):
    _touch(tmp_path, "a.tiff")
    path = _write(tmp_path, "slide_id,slide_path,annotation_path\n"
                            "a,a.tiff,\n"
                            "b,nope.tiff,\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    where = sorted(((row or 0), column) for _, row, column, _ in info.value.problems)
    assert where == [(0, "split"), (2, "slide_path")]  # grade is optional


def test_check_files_false_skips_only_the_file_checks(tmp_path):
    path = _write(tmp_path, HEADER + "a,no.tiff,no_mask.tiff,1,train,\n")
    (record,) = load_manifest(path, check_files=False).records
    assert record.slide_path == tmp_path / "no.tiff"
    bad = _write(tmp_path, HEADER + "a,no.tiff,,5,train,\n", "bad.csv")
    with pytest.raises(ManifestError) as info:
        load_manifest(bad, check_files=False)
    assert [(row, column) for _, row, column, _ in info.value.problems] == [(1, "grade")]


@pytest.mark.parametrize("text, problem", [
    ("", "empty file"),
    (HEADER, "no data rows"),
])
def test_empty_manifests(tmp_path, text, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError, match=problem):
        load_manifest(path)


def test_extra_fields_in_a_row_are_a_problem(tmp_path):
    _touch(tmp_path, "a.tiff")
    path = _write(tmp_path, HEADER + "a,a.tiff,,1,train,,surplus\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [(row, column) for _, row, column, _ in info.value.problems] == [(1, None)]


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "absent.csv")


def test_unknown_split_name_is_a_config_error(tmp_path):
    _touch(tmp_path, "a.tiff")
    manifest = load_manifest(_write(tmp_path, HEADER + "a,a.tiff,,1,train,\n"))
    with pytest.raises(ConfigError, match="unknown split"):
        manifest.split("validation")


def test_default_manifest_is_the_repository_one():
    assert DEFAULT_MANIFEST == Path(__file__).resolve().parents[1] / "data_manifest.csv"
    manifest = load_manifest(DEFAULT_MANIFEST, check_files=False)
    assert all(r.slide_path.is_relative_to(DEFAULT_MANIFEST.parent / "cohort") for r in manifest)


def test_grade_is_optional_and_extra_columns_are_kept(tmp_path):
    _touch(tmp_path, "a.tiff", "b.tiff", "c.tiff")
    path = _write(tmp_path, "slide_id,slide_path,annotation_path,split,stain,scanner\n"
                            "a,a.tiff,,train,HE,X\n"
                            "b,b.tiff,,val,IHC,\n")
    a, b = load_manifest(path).records
    assert a.grade is None and a.attributes == {"stain": "HE", "scanner": "X"}
    assert b.attributes == {"stain": "IHC"}  # an empty cell leaves the attribute out
    assert hash(a) != hash(b)  # still hashable (frozen)
    with_grades = _write(tmp_path, HEADER.strip() + ",stain\n"
                         "a,a.tiff,,2,train,,HE\n"
                         "b,b.tiff,,,train,,HE\n"
                         "c,c.tiff,,5,train,,HE\n", "graded.csv")
    with pytest.raises(ManifestError) as info:
        load_manifest(with_grades)
    assert [(row, column) for _, row, column, _ in info.value.problems] == [(3, "grade")]


def test_classes_default_to_binary_or_come_from_the_sidecar(tmp_path):
    from h2g.io.classes import BINARY, ClassTable

    _touch(tmp_path, "a.tiff")
    path = _write(tmp_path, HEADER + "a,a.tiff,,1,train,\n")
    assert load_manifest(path).classes == BINARY
    (tmp_path / "manifest.classes.csv").write_text("name,value\nnormal,1\ntumour,2\nignore,0\n")
    table = load_manifest(path).classes
    assert table.names == ("normal", "tumour") and table.ignore == (0,)
    given = ClassTable.of([("x", 0), ("y", 1)])
    assert load_manifest(path, classes=given).classes is given
