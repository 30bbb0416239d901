"""Export a fine-tuned CLIP in open_clip's layout, and WiSE-FT weight interpolation of the image tower.

The exported file is a safetensors state dict in open_clip's own layout (``visual.*`` for the image tower,
``transformer.*``, ``token_embedding.*``, ... for the text tower), taken from the open_clip model inside a
:class:`~robustfm.models.clip.ClipModel`. Method-only heads (CG-CLIP's decoder) live outside that model, so they
cannot leak into the file: ``open_clip.create_model(arch)`` followed by ``load_state_dict`` (strict) loads it back,
and so does ``robustfm.models.create_model(name, pretrained=path)``.

WiSE-FT (Wortsman et al., 2022) mixes the pretrained and fine-tuned weights, ``(1 - alpha) * pretrained + alpha *
fine-tuned``, to trade a method's new skill against what CLIP already knew (zero-shot accuracy). Here it is applied
to the image tower only; the text tower and temperature are exported as fine-tuned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from robustfm.models.clip import ClipModel, open_clip_state_dict
from robustfm.models.timm_classifier import TimmClassifier

IMAGE_TOWER_PREFIX = "visual."
"""open_clip's CLIP keeps its image tower in the ``visual`` submodule; its state-dict keys start with this."""


def clip_state_dict(model: ClipModel) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the open_clip state dict of ``model``, decoder excluded.

    Keys and shapes are open_clip's own (``logit_scale`` back to 0-dim), so the dict loads strictly into
    ``open_clip.create_model(arch)``.
    """
    state = open_clip_state_dict(model)
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def image_tower_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image-tower entries (``visual.*``) of an open_clip CLIP state dict."""
    tower = {key: value for key, value in state.items() if key.startswith(IMAGE_TOWER_PREFIX)}
    if not tower:
        raise ValueError(f"state dict has no image tower: no key starts with {IMAGE_TOWER_PREFIX!r}")
    return tower


def interpolate_weights(
    pretrained_state: Mapping[str, torch.Tensor], finetuned_state: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * pretrained + alpha * finetuned`` for every floating-point tensor.

    ``alpha = 0`` gives the pretrained weights, ``alpha = 1`` the fine-tuned ones (values outside [0, 1] extrapolate).
    The mix is computed in float32 and cast back to the fine-tuned dtype. Integer and boolean tensors cannot be
    mixed and must be equal in both.

    Raises:
        ValueError: when the two state dicts differ in keys, shapes, or in a non-floating tensor.
    """
    if not math.isfinite(alpha):
        raise ValueError(f"interpolation coefficient alpha must be a finite number, got {alpha!r}")
    missing, extra = (
        sorted(set(finetuned_state) - set(pretrained_state)),
        sorted(set(pretrained_state) - set(finetuned_state)),
    )
    if missing or extra:
        raise ValueError(
            f"cannot interpolate state dicts with different keys: only fine-tuned has {missing[:5]}, "
            f"only pretrained has {extra[:5]}"
        )
    mixed: dict[str, torch.Tensor] = {}
    for key, finetuned in finetuned_state.items():
        pretrained = pretrained_state[key]
        if pretrained.shape != finetuned.shape:
            raise ValueError(
                f"{key}: pretrained shape {tuple(pretrained.shape)} != fine-tuned {tuple(finetuned.shape)}"
            )
        if finetuned.is_floating_point():
            start = pretrained.detach().to(device=finetuned.device, dtype=torch.float32)
            end = finetuned.detach().float()
            mixed[key] = torch.lerp(start, end, float(alpha)).to(finetuned.dtype)
        else:
            if not torch.equal(pretrained.to(finetuned.device), finetuned):
                raise ValueError(
                    f"{key}: non-floating tensors differ between pretrained and fine-tuned; cannot mix them"
                )
            mixed[key] = finetuned.detach().clone()
    return mixed


def _write(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage; clone so tied or sliced weights are written independently.
    save_file(
        {key: value.detach().cpu().contiguous().clone() for key, value in state.items()},
        str(path),
        metadata=dict(metadata),
    )
    return path


def export_image_tower(
    model: ClipModel,
    path: str | Path,
    *,
    image_state: Mapping[str, torch.Tensor] | None = None,
    include_text_tower: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the fine-tuned CLIP's image tower (and by default its text tower) as safetensors, without the decoder.

    Args:
        model: the fine-tuned ClipModel.
        path: the ``.safetensors`` file to write.
        image_state: ``visual.*`` weights to export instead of the model's own (e.g. a WiSE-FT mix).
        include_text_tower: True writes the whole open_clip state dict, loadable with a strict ``load_state_dict``
            into ``open_clip.create_model(arch)``; False writes ``visual.*`` only (load with ``strict=False``).
        metadata: extra string metadata stored in the file header.

    Returns:
        The written path.
    """
    state = clip_state_dict(model)
    if image_state is not None:
        expected = set(image_tower_state(state))
        if set(image_state) != expected:
            raise ValueError(
                "image_state must hold exactly the model's image-tower keys; differs in "
                f"{sorted(set(image_state) ^ expected)[:5]}"
            )
        state.update(image_state)
    if not include_text_tower:
        state = image_tower_state(state)
    header = {
        "format": "open_clip",
        "arch": str(model.arch),
        "towers": "image+text" if include_text_tower else "image",
    }
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return _write(state, Path(path), header)


def timm_state_dict(model: TimmClassifier) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the timm model's own state dict (timm's layout: ``timm.create_model(arch)`` loads it
    strictly, and so does ``robustfm.models.create_model("timm/<arch>", pretrained=path)``)."""
    return {key: value.detach().cpu().clone() for key, value in model.model.state_dict().items()}


def mixable_state(model: ClipModel | TimmClassifier) -> dict[str, torch.Tensor]:
    """The weights WiSE-FT mixes: a CLIP's image tower (its text tower stays as fine-tuned), a timm classifier's
    whole network."""
    if isinstance(model, TimmClassifier):
        return timm_state_dict(model)
    return image_tower_state(clip_state_dict(model))


def export_model(
    model: ClipModel | TimmClassifier,
    path: str | Path,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` in its library's own layout (open_clip: :func:`export_image_tower` with the text tower;
    timm: the timm state dict), with ``state`` (the :func:`mixable_state` keys, e.g. a WiSE-FT mix) in place of the
    model's own weights."""
    if not isinstance(model, TimmClassifier):
        return export_image_tower(model, path, image_state=state, metadata=metadata)
    own = timm_state_dict(model)
    if state is not None and set(state) != set(own):
        differing = sorted(set(state) ^ set(own))[:5]
        raise ValueError(f"state must hold exactly the timm model's keys; differs in {differing}")
    header = {"format": "timm", "arch": str(model.arch), **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return _write(own if state is None else state, Path(path), header)


def export_wise_ft(
    model: ClipModel | TimmClassifier,
    pretrained_state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    alphas: Sequence[float],
) -> dict[float, Path]:
    """Export one file per WiSE-FT coefficient, mixing the :func:`mixable_state` between pretrained and fine-tuned.

    Args:
        model: the fine-tuned ClipModel (its image tower is mixed) or TimmClassifier (all of it).
        pretrained_state: the weights before fine-tuning: :func:`clip_state_dict` (only ``visual.*`` is used) or
            :func:`timm_state_dict` of the model taken before stage 1.
        out_dir: folder for ``<clip|timm>_wiseft_alpha{alpha:.2f}.safetensors``.
        alphas: mixing coefficients (0 = pretrained, 1 = fine-tuned).

    Returns:
        ``{alpha: path}`` in the order given.
    """
    if not alphas:
        raise ValueError("export_wise_ft needs at least one mixing coefficient")
    family = "timm" if isinstance(model, TimmClassifier) else "clip"
    names = [f"{family}_wiseft_alpha{float(a):.2f}.safetensors" for a in alphas]
    if len(set(names)) != len(names):
        raise ValueError(f"WiSE-FT coefficients must differ at two decimals, got {list(alphas)}")
    finetuned = mixable_state(model)
    pretrained = dict(pretrained_state) if family == "timm" else image_tower_state(pretrained_state)
    written: dict[float, Path] = {}
    for alpha, name in zip(alphas, names, strict=True):
        mixed = interpolate_weights(pretrained, finetuned, float(alpha))
        metadata = {"wiseft_alpha": f"{float(alpha):g}"}
        written[float(alpha)] = export_model(model, Path(out_dir) / name, state=mixed, metadata=metadata)
    return written
