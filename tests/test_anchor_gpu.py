"""bench/anchor_gpu.py, the raw-step anchors: its command line and the one-prompt-per-image patch, without
running a measurement (``python bench/anchor_gpu.py --smoke`` runs every section at tiny size, by hand)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "anchor_gpu.py"


@pytest.fixture(scope="module")
def anchor():
    spec = importlib.util.spec_from_file_location("anchor_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_section_is_refused_with_the_valid_ones(anchor, capsys):
    with pytest.raises(SystemExit) as e:
        anchor.main(["smp_train", "frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "sam_decoder_train" in err and "gpu_sharing" in err


def test_one_prompt_per_image_skips_only_the_batch_repeat_and_restores(anchor):
    orig = torch.repeat_interleave
    t = torch.arange(6).reshape(3, 2)
    with anchor.one_prompt_per_image():
        assert torch.repeat_interleave(t, 3, dim=0) is t            # one prompt per image: no B² rows
        assert torch.repeat_interleave(t, 2, dim=0).shape == (6, 2)  # any other repeat is the library's
    assert torch.repeat_interleave is orig
    with pytest.raises(RuntimeError), anchor.one_prompt_per_image():
        raise RuntimeError("a failing section")
    assert torch.repeat_interleave is orig


def test_every_section_is_named_in_the_docstring(anchor):
    assert set(anchor.SECTIONS) == {"sam_encoder", "sam_decoder_train", "smp_train", "transunet_encoder_train",
                                    "gpu_sharing"}
    assert all(f"``{name}``" in anchor.__doc__ for name in anchor.SECTIONS)
    assert "docs/performance.md" in anchor.__doc__
