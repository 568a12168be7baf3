"""Files a data folder should not hold, named as what they are: a symbolic-link loop, a broken link, a folder
under a case file's name; and `data check` on thousands of bad files stays short (the first few of each
kind, then a count)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from trainables.data.base import DataError, file_problem, summarize_problems
from trainables.data.check import check_dataset, format_report
from trainables.data.layouts import get_layout
from trainables.data.nifti import read_nifti

from helpers import write_nifti


def good_case(folder: Path, case: str) -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[4:10, 4:10, 1:3] = 1
    write_nifti(folder / f"{case}.nii.gz", rng.normal(size=(16, 16, 4)).astype(np.float32))
    write_nifti(folder / f"{case}_segmentation.nii.gz", mask)


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "data" / "SiteA"
    site.mkdir(parents=True)
    good_case(site, "Case00")
    return site


def test_a_symlink_loop_is_named_as_a_loop(site, capsys):
    good_case(site, "Case01")
    (site / "Case01.nii.gz").unlink()
    os.symlink("Case01.nii.gz", site / "Case01.nii.gz")  # points at itself
    report = check_dataset(site.parent, "prostate_multisite")
    text = format_report(report)
    assert not report.ok and report.sites[0].cases == 1
    assert f"ERROR: {site / 'Case01.nii.gz'}: a symbolic link loop (it points to 'Case01.nii.gz'" in text, text
    assert "without an image" not in text  # the old message: "mask without an image ... Add the image"
    with pytest.raises(DataError, match="symbolic link loop"):
        get_layout("prostate_multisite").list_cases(site.parent, "SiteA")
    with pytest.raises(DataError, match="symbolic link loop"):  # loading names it too, not "corrupt NIfTI"
        read_nifti(site / "Case01.nii.gz")


def test_broken_links_and_folders_are_named(site):
    good_case(site, "Case02")
    (site / "Case02.nii.gz").unlink()
    os.symlink(site / "gone.nii.gz", site / "Case02.nii.gz")
    (site / "Case03_segmentation.nii.gz").mkdir()
    assert "a broken symbolic link (to" in file_problem(site / "Case02.nii.gz")
    assert "a folder where a case file is expected" in file_problem(site / "Case03_segmentation.nii.gz")
    assert file_problem(site / "Case00.nii.gz") is None
    text = format_report(check_dataset(site.parent, "prostate_multisite"))
    assert "Case02.nii.gz: a broken symbolic link" in text and "Case03_segmentation.nii.gz: a folder" in text


def test_unreadable_file_is_named(site):
    """Permission bits stop only a user other than root: as root, a FIFO stands in (it cannot be read as a file)."""
    path = site / "Case04.nii.gz"
    if os.geteuid() == 0:
        os.mkfifo(path)
        assert "not a regular file" in file_problem(path)
    else:
        path.write_bytes(b"x")
        path.chmod(0)
        assert "unreadable (Permission denied)" in file_problem(path)


def test_data_check_on_thousands_of_bad_files_stays_short(site):
    t = time.time()
    for i in range(10, 2010):  # 2,000 images without masks
        (site / f"Case{i}.nii.gz").write_bytes(b"")
    for i in range(3000, 3500):  # and 500 link loops
        os.symlink(f"Case{i}_segmentation.nii.gz", site / f"Case{i}_segmentation.nii.gz")
    made = time.time() - t
    report = check_dataset(site.parent, "prostate_multisite")
    text = format_report(report)
    lines = text.splitlines()
    assert len(report.errors) == 2500 and len(lines) < 20, text
    assert "... and 1997 more of this kind" in lines and "... and 497 more of this kind" in lines
    assert sum(line.startswith("ERROR: ") for line in lines) == 6
    assert "skipped 2500 (see the errors below): " in text and "and 2490 more" in text
    assert time.time() - t - made < 10


def test_summaries_group_by_kind_in_order():
    msgs = [f"/d/Case{i}.nii.gz: image without a mask (expected Case{i}_segmentation.nii.gz in /d)" for i in range(5)]
    msgs.insert(1, "/d/x.nii.gz: a symbolic link loop (it points to 'x.nii.gz', which leads back to itself)")
    out = summarize_problems(msgs, first=2)
    assert out == [msgs[0], msgs[2], "... and 3 more of this kind", msgs[1]]
