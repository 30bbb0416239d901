"""WiSE-FT and export of a timm classifier: timm's own layout, loadable by name + path; alpha 0 and 1 are the ends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robustfm.models import create_model
from robustfm.models.export import export_model, export_wise_ft, timm_state_dict


def test_timm_export_and_wise_ft_mixes_load_back_by_name_and_path(tmp_path):
    torch.manual_seed(0)
    pretrained = create_model("timm/tiny-vit")
    finetuned = create_model("timm/tiny-vit")  # other random weights stand in for fine-tuning
    start = timm_state_dict(pretrained)
    path = export_model(finetuned, tmp_path / "model.safetensors", metadata={"recipe": "cft"})
    assert set(load_file(str(path))) == set(finetuned.model.state_dict())
    mixes = export_wise_ft(finetuned, start, tmp_path / "wise_ft", [0.0, 0.5, 1.0])
    assert [p.name for p in mixes.values()] == [f"timm_wiseft_alpha{a}.safetensors" for a in ("0.00", "0.50", "1.00")]
    pixels = torch.rand(2, 3, finetuned.image_size, finetuned.image_size)
    with torch.no_grad():
        ends = {0.0: pretrained.eval()(pixels), 1.0: finetuned.eval()(pixels)}
        for alpha, expected in ends.items():
            loaded = create_model("timm/tiny-vit", pretrained=str(mixes[alpha])).eval()
            torch.testing.assert_close(loaded(pixels), expected)
    key = next(k for k, v in start.items() if v.is_floating_point() and v.numel() > 1)
    half = load_file(str(mixes[0.5]))[key]
    torch.testing.assert_close(half, 0.5 * start[key] + 0.5 * finetuned.model.state_dict()[key])
    with pytest.raises(ValueError, match="exactly the timm model's keys"):
        export_model(finetuned, tmp_path / "bad.safetensors", state={"head.weight": start["head.weight"]})
