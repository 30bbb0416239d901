"""The pieces of ``benchmarks/fidelity_cft.py``, fast (its ``--quick`` mode trains a base for ~30 s on a quiet core,
too slow for this suite): the planted cue (the watermark's colour encodes the class, cue-flipped uses class y+1's,
no-cue has none, never on the object), exact object masks, RRDA's pasting, one step of every run through the
registered tasks, and the check lines of the report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fidelity_cft as bench  # noqa: E402
from cft_cue_data import (  # noqa: E402
    CLASS_SHAPES,
    CUE_COLORS,
    NOISE_STD,
    PATCH,
    cue_images,
    pasted_on_other_context,
)

N = 24


@pytest.fixture(scope="module")
def data():
    return cue_images(N, seed=3)


def _cell_colours(pixels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` uint8-valued colour of every pixel of each watermark cell, checked to be one colour."""
    out = []
    for image, (top, left) in zip(pixels, cells.tolist(), strict=True):
        patch = (image[:, top : top + PATCH, left : left + PATCH] * 255).round()
        assert (patch == patch[:, :1, :1]).all()
        out.append(patch[:, 0, 0])
    return torch.stack(out)


def test_the_watermark_colour_encodes_the_class_and_flipped_uses_the_next_class(data):
    colours = torch.tensor(CUE_COLORS, dtype=torch.float32)
    assert torch.equal(_cell_colours(data.with_cue(0), data.cells), colours[data.labels])
    assert torch.equal(_cell_colours(data.with_cue(1), data.cells), colours[(data.labels + 1) % len(CLASS_SHAPES)])
    assert data.with_cue(None) is data.clean
    marks = data.watermark_masks().bool()
    for shift in (0, 1):  # only the watermark's pixels differ from the clean image
        changed = (data.with_cue(shift) != data.clean).any(dim=1, keepdim=True)
        assert not (changed & ~marks).any()
    assert len(set(data.labels.tolist())) > 1


def test_masks_are_exact_and_never_touch_the_watermark(data):
    masks = data.masks.bool()
    assert not (masks & data.watermark_masks().bool()).any()
    assert (data.cells % PATCH == 0).all()
    checked = 0
    for image, mask in zip(data.clean, masks[:, 0], strict=True):
        assert mask.any() and (~mask).any()
        inside, outside = image[:, mask].median(dim=1).values, image[:, ~mask].median(dim=1).values
        if torch.linalg.norm(inside - outside) < 0.25:  # too alike to tell pixel by pixel through the noise
            continue
        near_inside = (image - inside[:, None, None]).norm(dim=0) < (image - outside[:, None, None]).norm(dim=0)
        assert torch.equal(near_inside, mask)  # every object pixel and no other is painted in the object's colour
        checked += 1
    assert checked >= N // 2


def test_generation_is_a_function_of_the_seed():
    first, again, other = cue_images(4, seed=5), cue_images(4, seed=5), cue_images(4, seed=6)
    assert torch.equal(first.clean, again.clean) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.clean, other.clean)


def test_rrda_pastes_each_object_onto_another_image_s_context_without_its_object(data):
    pixels = data.with_cue(0)
    pasted, order = pasted_on_other_context(pixels, data.masks, torch.Generator().manual_seed(0))
    inside = data.masks.bool().expand_as(pixels)
    assert torch.equal(pasted[inside], pixels[inside])
    context_masks = data.masks[order].bool().expand_as(pixels)
    outside = ~inside & ~context_masks  # the context image's own pixels, its object removed
    assert torch.equal(pasted[outside], pixels[order][outside])
    filled = ~inside & context_masks
    for row in range(N):  # where the context's object was: one flat colour and the images' noise
        values = pasted[row][filled[row]].reshape(3, -1)
        if values.shape[1] > 10:
            assert values.std(dim=1).max() < 2.5 * NOISE_STD / 255


@pytest.mark.parametrize("name", list(bench.RUNS))
def test_one_step_of_every_run_changes_the_weights(data, name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method, settings = bench.RUNS[name]
        torch.manual_seed(0)
        base = bench.create_model("timm/tiny-vit")
        task = bench.build_task(method, settings, base.state_dict())
        if name == "control":
            assert task.active_losses == frozenset({"cls"})  # lambda_align = 0: no map is computed
        step = bench.make_step(task, settings.loss_weights(), steps=2)
        batch = bench.training_batch(method, data, data.with_cue(0), torch.arange(4), torch.Generator())
        step(batch)
        before, after = base.state_dict(), task.model.state_dict()
        assert any(not torch.equal(before[key], after[key]) for key in before)
        row = bench.evaluate(task.model, cue_images(8, seed=9))
        assert set(row) == {*bench.TEST_SETS, "relevance in mask"}
        assert all(0.0 <= value <= 1.0 for value in row.values())
    finally:
        torch.set_num_threads(threads)


def _seed(seed: int, flipped_gain: float) -> dict:
    rows = {name: {"cue-consistent": 1.0, "cue-flipped": 0.3, "no cue": 0.7, "relevance in mask": 0.3} for name in
            ["base", *bench.RUNS]}  # fmt: skip
    rows["CFT (gae)"] = {**rows["base"], "cue-flipped": 0.3 + flipped_gain, "relevance in mask": 0.6 + seed / 100}
    return {"seed": seed, "rows": rows}


def test_the_report_gates_on_the_cue_flipped_gain_over_the_control(capsys):
    times = {name: [0.1, 0.2, 0.3, 0.2, 0.1] for name in bench.SPEED_RUNS}
    budget = bench.QUICK
    assert bench.report([_seed(s, 0.4 + s / 100) for s in range(3)], budget, times)
    printed = capsys.readouterr().out
    assert "| CFT (gae) | 1.000 [1.000, 1.000] |" in printed
    assert "PASS  CFT (gae) cue-flipped top-1 minus the control's: +0.410" in printed
    assert not bench.report([_seed(s, 0.05 + s / 100) for s in range(3)], budget, times)
    assert "FAIL  CFT (gae) cue-flipped top-1 minus the control's" in capsys.readouterr().out


def test_the_precondition_is_half_the_cue_consistent_top1():
    assert bench.reads_cue({"cue-consistent": 1.0, "cue-flipped": 0.5})
    assert not bench.reads_cue({"cue-consistent": 1.0, "cue-flipped": 0.51})
