"""COVAR variants: exact composites, seeded parameters in the paper's ranges, and geometry shared by image and mask."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from robustfm.perturbations.covar import (
    CANVASES,
    COVAR_VARIANTS,
    SCALE_FACTORS,
    apply_variant,
    composite,
    covar_rows,
    draw_params,
    variant_params_record,
    variant_seed,
)

SIZE = 48  # divisible by every scale factor, so a block-aligned mask shrinks to exactly area / f^2


def random_image(seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def blob_mask(size: int = SIZE) -> torch.Tensor:
    """An off-centre disc, so that flips and shifts move it somewhere else."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((rows - size * 0.4) ** 2 + (cols - size * 0.6) ** 2) < (size * 0.25) ** 2).float()[None]


def test_composite_takes_foreground_from_image_and_the_rest_from_background():
    image, background = random_image(0), random_image(1)
    mask = (torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    out = composite(image, mask, background)
    foreground = mask.expand_as(image).bool()
    assert torch.equal(out[foreground], image[foreground])
    assert torch.equal(out[~foreground], background[~foreground])
    batched = composite(
        image[None].repeat(2, 1, 1, 1), mask[None].repeat(2, 1, 1, 1), background[None].repeat(2, 1, 1, 1)
    )
    assert torch.equal(batched[1], out)


def test_composite_names_the_shapes_when_they_differ():
    with pytest.raises(ValueError, match=r"\(1, 32, 32\).*\(3, 48, 48\)"):
        composite(random_image(0), torch.ones(1, 32, 32), random_image(1))


@pytest.mark.parametrize("variant", ["hflip", "vflip"])
def test_flips_keep_the_mask_area_and_undo_themselves(variant):
    image, mask = random_image(0), blob_mask()
    flipped, flipped_mask = apply_variant(image, mask, variant, {})
    axis = -1 if variant == "hflip" else -2  # hflip mirrors left-right (columns), vflip top-bottom (rows)
    assert torch.equal(flipped, image.flip(axis)) and torch.equal(flipped_mask, mask.flip(axis))
    assert flipped_mask.sum() == mask.sum()
    assert not torch.equal(flipped_mask, mask)
    again, again_mask = apply_variant(flipped, flipped_mask, variant, {})
    assert torch.equal(again, image) and torch.equal(again_mask, mask)


RANGES = {
    "translate": {"dx": (-0.2, 0.2), "dy": (-0.2, 0.2)},
    "crop": {"area": (0.6, 0.9)},
    "rotation": {"degrees": (-45.0, 45.0)},
    "scale": {"fx": (0.0, 1.0), "fy": (0.0, 1.0)},
}


@pytest.mark.parametrize("variant", COVAR_VARIANTS)
def test_drawn_parameters_stay_in_range_and_repeat_for_the_same_seed(variant):
    draws = [draw_params(variant, seed) for seed in range(200)]
    assert draws == [draw_params(variant, seed) for seed in range(200)]
    for key, (low, high) in RANGES.get(variant, {}).items():
        values = [d[key] for d in draws]
        assert low <= min(values) and max(values) <= high
        assert max(values) - min(values) > 0.8 * (high - low)  # spread over the range, not stuck at one value
    if variant == "scale":
        assert {d["factor"] for d in draws} == {float(f) for f in SCALE_FACTORS}
    if variant in ("hflip", "vflip"):
        assert all(d == {} for d in draws)


def test_variant_seeds_differ_per_key_and_match_another_process():
    keys = [("n01/a.jpg", "bg1", "rotation"), ("n01/b.jpg", "bg1", "rotation"), ("n01/a.jpg", "bg2", "rotation")]
    keys += [("n01/a.jpg", "bg1", "crop")]
    seeds = [variant_seed(*key, seed=3) for key in keys]
    assert len(set(seeds)) == len(seeds)
    assert variant_seed(*keys[0], seed=4) != seeds[0]
    code = f"from robustfm.perturbations.covar import variant_seed; print(variant_seed(*{keys[0]!r}, seed=3))"
    env = {"PYTHONHASHSEED": "12345"}  # a different str hash salt: the seed must not depend on hash()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert int(result.stdout) == seeds[0]


def test_translate_moves_a_pixel_by_the_rounded_fractions():
    image, mask = torch.zeros(3, 32, 32), torch.zeros(1, 32, 32)
    image[:, 10, 12], mask[:, 10, 12] = 1.0, 1.0
    moved, moved_mask = apply_variant(image, mask, "translate", {"dx": 0.1, "dy": -0.15})  # +3.2 cols, -4.8 rows
    expected = torch.zeros(3, 32, 32)
    expected[:, 10 - 5, 12 + 3] = 1.0
    assert torch.equal(moved, expected) and torch.equal(moved_mask, expected[:1])


@pytest.mark.parametrize("area", [0.6, 0.75, 0.9])
def test_crop_keeps_the_centre_colour(area):
    image = random_image(0, 32)
    colour = torch.tensor([0.2, 0.5, 0.9])
    image[:, 8:24, 8:24] = colour[:, None, None]
    cropped, cropped_mask = apply_variant(image, torch.ones(1, 32, 32), "crop", {"area": area})
    torch.testing.assert_close(cropped[:, 16, 16], colour, atol=1e-5, rtol=0)
    assert cropped.shape == image.shape and cropped_mask.shape == (1, 32, 32)
    assert not torch.allclose(cropped, image)  # the crop zoomed in: the random border moved


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    image, mask = random_image(0, 32), blob_mask(32)
    rotated, rotated_mask = apply_variant(image, mask, "rotation", {"degrees": 90.0})
    torch.testing.assert_close(rotated, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(rotated_mask, torch.rot90(mask, 1, dims=(-2, -1)))


def _nonzero_box(image: torch.Tensor) -> tuple[slice, slice]:
    rows, cols = torch.nonzero(image.sum(0), as_tuple=True)
    return slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)


@pytest.mark.parametrize("factor", SCALE_FACTORS)
def test_scale_shrinks_onto_the_canvas(factor):
    image, background = torch.full((3, SIZE, SIZE), 0.5), random_image(1)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :24, :24] = 1.0  # block-aligned for every factor
    params = {"factor": float(factor), "fx": 0.3, "fy": 0.8}
    on_black, black_mask = apply_variant(image, mask, "scale", params, canvas="black")
    rows, cols = _nonzero_box(on_black)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (SIZE // factor, SIZE // factor)
    torch.testing.assert_close(on_black[:, rows, cols], torch.full_like(on_black[:, rows, cols], 0.5))
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.all(on_black[:, outside] == 0) and torch.all(black_mask[:, outside] == 0)
    assert math.isclose(float(black_mask.sum()), float(mask.sum()) / factor**2, rel_tol=0.1)
    on_background, background_mask = apply_variant(image, mask, "scale", params, background=background)
    assert torch.equal(on_background[:, outside], background[:, outside])
    assert torch.equal(background_mask, black_mask)


def test_scale_on_background_canvas_needs_the_background():
    with pytest.raises(ValueError, match="background"):
        apply_variant(random_image(0), blob_mask(), "scale", draw_params("scale", 0))


@pytest.mark.parametrize("canvas", CANVASES)
@pytest.mark.parametrize("variant", COVAR_VARIANTS)
def test_masks_stay_binary_after_every_variant(variant, canvas):
    image, background, mask = random_image(0), random_image(1), blob_mask()
    for seed in range(5):
        params = draw_params(variant, seed)
        out, out_mask = apply_variant(image, mask, variant, params, background=background, canvas=canvas)
        assert out.shape == image.shape and out_mask.shape == mask.shape
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_covar_rows_count_labels_and_determinism():
    image, mask = random_image(0, 32), blob_mask(32)
    backgrounds = {"bg2": random_image(2, 32), "bg1": random_image(1, 32), "bg3": random_image(3, 32)}
    variants = ("hflip", "rotation", "scale")
    rows = covar_rows(image, mask, backgrounds, "n01/a.jpg", variants=variants, seed=1)
    assert len(rows) == 1 + 3 * (1 + len(variants))
    labels = [(label, bg) for label, bg, _, _ in rows]
    assert labels[:4] == [("original", ""), ("bg_varied", "bg1"), ("bg_varied", "bg2"), ("bg_varied", "bg3")]
    assert labels[4:] == [(v, bg) for bg in ("bg1", "bg2", "bg3") for v in variants]
    assert torch.equal(rows[1][2], composite(image, mask, backgrounds["bg1"]))
    again = covar_rows(image, mask, backgrounds, "n01/a.jpg", variants=variants, seed=1)
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) for a, b in zip(rows, again, strict=True))
    other_seed = covar_rows(image, mask, backgrounds, "n01/a.jpg", variants=variants, seed=2)
    assert not torch.equal(rows[5][2], other_seed[5][2])  # rows[5] is bg1's rotation


def test_params_record_matches_the_rows_draws():
    record = variant_params_record("n01/a.jpg", {"bg2": None, "bg1": None}, ("crop", "scale"), seed=1)
    assert [(r["background_id"], r["variant"]) for r in record] == [
        ("bg1", "crop"),
        ("bg1", "scale"),
        ("bg2", "crop"),
        ("bg2", "scale"),
    ]
    assert record[0]["params"] == draw_params("crop", variant_seed("n01/a.jpg", "bg1", "crop", 1))
    import json

    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize(
    "call", [lambda: draw_params("rotate", 0), lambda: apply_variant(random_image(0), blob_mask(), "flip", {})]
)
def test_unknown_variant_names_the_valid_ones(call):
    with pytest.raises(ValueError, match=", ".join(COVAR_VARIANTS)):
        call()
