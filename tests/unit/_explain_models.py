"""Small float64 ViTs and a parameter -> relevance-map function for the explain tests' gradchecks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from robustfm.explain.relevance import relevance
from robustfm.models import TimmClassifier, create_model


def tiny_vit64(depth: int = 1, seed: int = 0) -> TimmClassifier:
    """A width-8, 2-head timm ViT on 64 px with 16 px patches (4x4 grid, class + 1 register token), float64, eval."""
    create_model("timm/tiny-vit")  # registers robustfm_tiny_vit with timm
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("robustfm_tiny_vit", embed_dim=8, depth=depth, num_heads=2, patch_size=16, mlp_ratio=2.0)
    model = TimmClassifier(vit, "tiny-vit-w8").double().eval()
    model.pixels = _Float64Normalize(model.pixels)
    return model


class _Float64Normalize(torch.nn.Module):
    """The wrapper's normalisation without its float32 round trip, so that finite differences in the pixels (input
    gradients) are float64-exact."""

    def __init__(self, pixels: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", pixels.mean.double(), persistent=False)
        self.register_buffer("std", pixels.std.double(), persistent=False)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (pixels - self.mean) / self.std


class _MapOf(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, method: str, classes: torch.Tensor, options: dict) -> None:
        super().__init__()
        self.inner, self.method, self.classes, self.options = model, method, classes, options

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return relevance(self.method, self.inner, pixels, self.classes, create_graph=True, **self.options)


def parameter_function(
    model: torch.nn.Module, name: str, method: str, pixels: torch.Tensor, classes: torch.Tensor, **options
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(f, value)``: ``f(w)`` is the ``method`` map (``create_graph=True``) with parameter ``name`` set to ``w``, for
    ``torch.autograd.gradcheck(f, (value,))``. The map is divided by its largest magnitude at ``value`` (a constant),
    so that gradcheck's absolute tolerance is relative to the map's scale (raw maps of a random width-8 ViT are
    ~1e-4: an absolute 1e-5 would hide a 10 % error)."""
    value = dict(model.named_parameters())[name].detach().clone().requires_grad_(True)
    wrapper = _MapOf(model, method, classes, options)
    with torch.no_grad():
        scale = float(wrapper(pixels).abs().max())
    if scale == 0:
        raise ValueError(f"{method}: the map is zero at {name}'s value; pick another model or input")

    def fn(weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, {f"inner.{name}": weight}, (pixels,)) / scale

    return fn, value
