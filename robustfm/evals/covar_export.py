"""Write COVAR's generated variants to disk for inspection (``jobs/covar.py --export DIR``): what the ``covar``
suite's actors score, without a model and without Ray.

For the first ``samples`` images (by id) of the suite's data split: ``DIR/<id>/<subset>[__<background>].png`` and
the matching ``..._mask.png`` (0/255), ``DIR/<id>/params.json`` with every drawn parameter and seed, and
``DIR/summary.json`` with the counts and the images skipped with their reason (bad masks, undecodable images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from robustfm.evals.covar_inputs import backgrounds_of, foreground_mask, load_backgrounds
from robustfm.evals.runner import safe_name


def _png(pixels: Any, path: Path) -> None:
    from PIL import Image

    array = np.asarray(pixels)
    array = array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3) else array
    Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8).squeeze()).save(path)


def export_variants(section: Any, out_dir: str | Path, *, image_size: int = 224, samples: int = 8, seed: int = 0):
    """Export the COVAR rows of ``samples`` images of ``section`` (a ``CovarConfig``); returns the summary.

    Raises:
        ValueError: naming the field, when ``section.data.shards`` or the background pool is unset or empty.
    """
    import torch

    from robustfm.data.images import ImageDecodeError
    from robustfm.data.shards import Location, list_split
    from robustfm.data.transforms import eval_image
    from robustfm.perturbations.covar import covar_rows, variant_params_record

    if section.data.shards is None:
        raise ValueError("eval.suites.covar.data.shards: the export reads shards with a 'mask' column; none is set")
    rows = list_split(Location(section.data.shards), section.data.split).read_rows(["id", "image", "mask"])
    pool = {}
    for name, data in load_backgrounds(section.backgrounds).items():
        try:
            pool[name] = torch.from_numpy(eval_image(data, image_size, name=f"background {name}"))
        except ImageDecodeError:
            continue
    out = Path(out_dir)
    order = sorted(range(len(rows["id"])), key=lambda i: rows["id"][i])[:samples]
    written, skipped = 0, {}
    for i in order:
        sample = str(rows["id"][i])
        mask, problem = foreground_mask(rows["image"][i], rows["mask"][i], image_size, sample)
        try:
            image = torch.from_numpy(eval_image(rows["image"][i], image_size, name=f"sample {sample}"))
        except ImageDecodeError as err:
            problem = err.reason
        if problem:
            skipped[sample] = problem
            continue
        chosen = {b: pool[b] for b in backgrounds_of(sample, sorted(pool), section.n_backgrounds, seed)}
        folder = out / safe_name(sample)
        folder.mkdir(parents=True, exist_ok=True)
        generated = covar_rows(image, mask, chosen, sample, variants=section.variants, seed=seed, canvas=section.canvas)
        for subset, background, pixels, variant_mask in generated:
            stem = subset + (f"__{safe_name(background)}" if background else "")
            _png(pixels, folder / f"{stem}.png")
            _png(variant_mask, folder / f"{stem}_mask.png")
            written += 1
        record = variant_params_record(sample, chosen, section.variants, seed)
        (folder / "params.json").write_text(json.dumps(record, indent=2))
    summary = {"images": len(order) - len(skipped), "files": 2 * written, "skipped": skipped, "out_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
