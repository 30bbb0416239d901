"""CFT's task (paper 001 §3) without Ray: the config and its registration, eqs 3-4 by hand and against the code's BCE,
empty masks, the exact gradient of L_align through every relevance method (gradcheck and gradgradcheck on a float64
1-block width-8 ViT), the second-order path to W_q/W_k, the cross-entropy's gradient, stages and the builder."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _explain_models import tiny_vit64
from torch import nn

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods import METHODS
from robustfm.methods.cft import CFTTask, alignment_losses, build_cft_task, concept_regions, floored_log
from robustfm.methods.cft_config import KNOWN_RELEVANCE, CFTConfig
from robustfm.train.config import StageConfig
from robustfm.train.task import StageSpec, check_param_groups

QKV = "model.model.blocks.0.attn.qkv.weight"
# Methods whose map has an exact parameter gradient; gae's code variant (grad_graph=False) treats dy/dA as a constant
# by design (tests/unit/test_explain_relevance.py checks it by hand). attn_gradcam's labels keep its clamped map from
# being all zero on this model.
EXACT = [
    ("gae", {"grad_graph": True}, (1, 2)),
    ("rollout", {}, (1, 2)),
    ("attn_gradcam", {}, (0, 5)),
    ("gradcam", {}, (1, 2)),
    ("input_gradient", {}, (1, 2)),
    ("attnlrp", {}, (1, 2)),
]


def _stage(weights: dict[str, float], **settings) -> StageSpec:
    groups = ("backbone", "head")
    config = StageConfig(trainable=groups, lr=dict.fromkeys(groups, 1e-3), loss_weights=weights, settings=settings)
    return StageSpec("finetune", config)


def _masks(n: int, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    mask[0, :, : size // 2, : size * 5 // 8] = 3  # any value > 0 is concept
    mask[1 % n, :, size // 4 : size - 4, size // 4 : size * 3 // 4] = 1
    return mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: with more threads than free cores, thread hand-offs cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit64(depth=1)


@pytest.fixture(scope="module")
def batch():
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {"image": pixels, "label": torch.tensor([1, 2]), "mask": _masks(2)}


class _CompositeLayerNorm(nn.LayerNorm):
    """LayerNorm from elementary ops. torch's fused layer_norm has exact first and second derivatives, but its double
    backward treats the saved std as a constant, so third derivatives are wrong (pytorch#175754); a gradgradcheck of
    L_align needs them (training needs only the second)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def _with_composite_norms(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            norm = _CompositeLayerNorm(child.normalized_shape, eps=child.eps, dtype=child.weight.dtype)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            _with_composite_norms(child)
    return module


def _align_of_qkv(task: CFTTask, batch: dict) -> tuple:
    """``(f, z0)``: L_align (eq 5) with W_qkv moved along 3 fixed random directions by ``z``."""
    start = dict(task.named_parameters())[QKV].detach().clone()
    directions = torch.randn(3, *start.shape, dtype=start.dtype, generator=torch.Generator().manual_seed(1))
    directions = directions * start.std()
    config = task.config

    def fn(z: torch.Tensor) -> torch.Tensor:
        weight = start + (z[:, None, None] * directions).sum(0)
        losses = torch.func.functional_call(task, {QKV: weight}, (batch,))
        return config.lambda_concept * losses["concept"] + config.lambda_non_concept * losses["non_concept"]

    return fn, torch.zeros(3, dtype=start.dtype, requires_grad=True)


# ---- config and registration ----


def test_defaults_are_the_papers_and_the_engine_weights_are_products():
    config = CFTConfig()
    assert (config.relevance, config.relevance_target, config.loss_resolution) == ("attnlrp", "label", "patch")
    assert (config.normalize, config.cls_target, config.temperature) == ("region", "prediction", 1.0)
    assert config.loss_weights() == pytest.approx({"concept": 0.4, "non_concept": 0.96, "cls": 0.2})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lambda_align", -0.1, "must be >= 0"),
        ("lambda_non_concept", -1.0, "must be >= 0"),
        ("relevance", "atnlrp", "did you mean 'attnlrp'"),
        ("relevance_target", "predicton", "did you mean 'prediction'"),
        ("loss_resolution", "pixels", "did you mean 'pixel'"),
        ("normalize", "all", "must be one of"),
        ("cls_target", "labels", "did you mean 'label'"),
        ("temperature", 0.0, "must be > 0"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        CFTConfig(**{field: value})
    assert error.value.field == field


def test_the_light_relevance_names_are_the_registry_s():
    from robustfm.explain import RELEVANCE

    assert list(KNOWN_RELEVANCE) == RELEVANCE.names()


def test_config_modules_import_no_torch():
    code = (
        "import sys; from robustfm.methods.cft_config import CFTConfig; import robustfm.methods.cft_baselines_config; "
        "CFTConfig(relevance='gae'); print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_registry_entries():
    meta = METHODS.meta("cft")
    assert meta["losses"] == ("concept", "non_concept", "cls")
    assert meta["param_groups"] == ("backbone", "head") and meta["config"] is CFTConfig
    assert meta["needs"] == ("double_backward_input",)
    assert set(meta["reports"]).isdisjoint(meta["losses"])


# ---- eqs 3-4 ----


def test_eqs_3_and_4_on_a_hand_computed_4x4_example():
    ln2 = math.log(2)
    phi = torch.tensor(
        [
            [[0.5, 0.25, 0.0, 0.5], [0.5, 0.25, 0.0, 0.75], [0.5, 0.25, 0.0, 0.5], [0.5, 0.25, 0.0, 0.75]],
            [[0.5] * 4] * 4,
        ],
        dtype=torch.float64,
    )
    region = torch.zeros(2, 4, 4, dtype=torch.bool)
    region[0, :, :2] = True  # S: the left half
    region[1, 0, 0] = True  # S: one pixel
    terms = alignment_losses(phi, region)
    # Sample 0: S holds four 0.5 and four 0.25 -> (4 ln2 + 8 ln2) / 8; S-bar four 0, two 0.5, two 0.75 -> 6 ln2 / 8.
    # Sample 1: -ln 0.5 over its one concept pixel and over its 15 others. Then the mean over the two samples.
    assert terms.concept.item() == pytest.approx((1.5 * ln2 + ln2) / 2, rel=1e-12)
    assert terms.non_concept.item() == pytest.approx((0.75 * ln2 + ln2) / 2, rel=1e-12)
    assert not terms.empty_concept.any() and not terms.empty_non_concept.any()


def test_all_pixels_is_the_codes_bce():
    gen = torch.Generator().manual_seed(0)
    phi = torch.rand(3, 8, 8, dtype=torch.float64, generator=gen)
    region = torch.rand(3, 8, 8, generator=gen) > 0.6
    phi[0, 0, 0], phi[1, 2, 2], phi[2, 3, 3] = 0.0, 1.0, 0.0  # min-max maps hit 0 (and 1 in float32)
    region[0, 0, 0], region[1, 2, 2], region[2, 3, 3] = True, False, False
    s = region.double()
    terms = alignment_losses(phi, region, "all_pixels")
    torch.testing.assert_close(terms.concept, nn.BCELoss()(phi * s, s), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.non_concept, nn.BCELoss()(phi * (1 - s), torch.zeros_like(s)), rtol=1e-12, atol=0)
    inner = (0.01 + 0.98 * phi).requires_grad_(True)  # away from BCE's clamped points: the gradients agree too
    terms = alignment_losses(inner, region, "all_pixels")
    (ours,) = torch.autograd.grad(terms.concept + terms.non_concept, inner)
    bce = nn.BCELoss()(inner * s, s) + nn.BCELoss()(inner * (1 - s), torch.zeros_like(s))
    (expected,) = torch.autograd.grad(bce, inner)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


def test_floored_log_is_bce_s_log_with_a_finite_gradient():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([0.0, 1e-45 if dtype == torch.float32 else 1e-50, 0.5, 1.0], dtype=dtype, requires_grad=True)
        value = floored_log(x)
        torch.testing.assert_close(value.detach(), torch.tensor([-100.0, -100.0, math.log(0.5), 0.0], dtype=dtype))
        (grad,) = torch.autograd.grad(value.sum(), x)
        torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 2.0, 1.0], dtype=dtype))


def test_patch_regions_are_area_fractions_of_at_least_half():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    mask[0, 0, :8, :16] = 1  # patch (0, 0) half covered: in
    mask[0, 0, :16, 16:] = 1  # patch (0, 1) covered: in
    mask[0, 0, 16:23, 16:32] = 5  # 7 of 16 rows of patch (1, 1): out
    regions = concept_regions(mask, "patch", (2, 2))
    assert regions.tolist() == [[[True, True], [False, False]]]
    assert torch.equal(concept_regions(mask, "pixel", (2, 2)), mask[:, 0] > 0)


def test_empty_regions_drop_out_are_counted_and_never_nan(vit):
    pixels = torch.rand(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(3, 1, 64, 64, dtype=torch.uint8)  # sample 0: no concept; sample 1: all concept
    mask[1], mask[2, :, 16:48, 8:40] = 1, 1
    labels = torch.tensor([0, 1, 2])
    task = CFTTask(vit, CFTConfig(relevance="gae"))
    losses = task({"image": pixels, "label": labels, "mask": mask})
    assert losses["empty_concept"].item() == pytest.approx(1 / 3)
    assert losses["empty_non_concept"].item() == pytest.approx(1 / 3)
    assert losses["constant_map"].item() == 0
    # A dropped sample counts 0 in a mean over the whole batch (what DDP averages): the other samples alone give the
    # same sum.
    for name, others in (("concept", [1, 2]), ("non_concept", [0, 2])):
        alone = task({"image": pixels[others], "label": labels[others], "mask": mask[others]})
        assert 3 * losses[name].item() == pytest.approx(2 * alone[name].item(), rel=1e-10)
    for everything in (0, 1):  # every sample drops out: 0, in the graph, finite gradients
        empty = task({"image": pixels, "label": labels, "mask": torch.full_like(mask, everything)})
        name = "concept" if everything == 0 else "non_concept"
        assert empty[name].item() == 0 and empty[name].requires_grad
        grads = torch.autograd.grad(empty["concept"] + empty["non_concept"], list(vit.parameters()), allow_unused=True)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


# ---- the gradient of L_align ----


@pytest.mark.parametrize("method, options, labels", EXACT, ids=[m for m, _, _ in EXACT])
def test_l_align_has_the_exact_gradient(vit, batch, method, options, labels):
    """gradcheck on the real (fused) LayerNorms: what training differentiates is exact."""
    task = CFTTask(vit, CFTConfig(relevance=method, **options))
    fn, z0 = _align_of_qkv(task, {**batch, "label": torch.tensor(labels)})
    assert torch.autograd.gradcheck(fn, (z0,), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, options, labels", EXACT, ids=[m for m, _, _ in EXACT])
def test_l_align_passes_gradgradcheck(batch, method, options, labels):
    model = _with_composite_norms(tiny_vit64(depth=1))
    task = CFTTask(model, CFTConfig(relevance=method, **options))
    fn, z0 = _align_of_qkv(task, {**batch, "label": torch.tensor(labels)})
    assert torch.autograd.gradgradcheck(fn, (z0,), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("normalize, resolution", [("all_pixels", "pixel"), ("region", "pixel")])
def test_the_code_s_variants_have_the_exact_gradient(vit, batch, normalize, resolution):
    task = CFTTask(vit, CFTConfig(relevance="attnlrp", normalize=normalize, loss_resolution=resolution))
    fn, z0 = _align_of_qkv(task, batch)
    assert torch.autograd.gradcheck(fn, (z0,), atol=1e-6, rtol=1e-4)


def test_attnlrp_alignment_reaches_the_query_and_key_rows(vit, batch):
    task = CFTTask(vit, CFTConfig())
    task.configure_stage(_stage({"concept": 0.4, "non_concept": 0.96}))
    losses = task(batch)
    assert "cls" not in losses
    weight = vit.model.blocks[0].attn.qkv.weight
    (grad,) = torch.autograd.grad(0.4 * losses["concept"] + 0.96 * losses["non_concept"], weight)
    width = weight.shape[1]
    assert grad[:width].abs().sum() > 0 and grad[width : 2 * width].abs().sum() > 0  # W_q, W_k
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("method", ["attnlrp", "gae", "rollout", "input_gradient"])
def test_the_cross_entropy_gradient_is_a_plain_model_s(vit, batch, method):
    """attnlrp's CE runs on its own rule-free forward, the others on the map's forward: either way its gradient is the
    plain model's."""
    task = CFTTask(vit, CFTConfig(relevance=method))
    losses = task(batch)
    params = list(vit.parameters())
    got = torch.autograd.grad(losses["cls"], params)
    logits = vit(batch["image"])
    expected = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(-1)), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_targets_and_temperature(vit, batch):
    with torch.no_grad():
        logits = vit(batch["image"])
    predicted = {**batch, "label": logits.argmax(-1)}
    by_label = CFTTask(vit, CFTConfig(relevance="gae"))(predicted)
    by_prediction = CFTTask(vit, CFTConfig(relevance="gae", relevance_target="prediction"))(batch)
    for name in ("concept", "non_concept", "cls"):
        torch.testing.assert_close(by_label[name], by_prediction[name])
    task = CFTTask(vit, CFTConfig(cls_target="label", temperature=0.5))
    task.configure_stage(_stage({"cls": 0.2}))
    losses = task(batch)
    assert set(losses) == {"cls"}
    torch.testing.assert_close(losses["cls"], F.cross_entropy(logits / 0.5, batch["label"]))


# ---- stages, groups and the builder ----


def test_stages_check_weights_apply_settings_and_set_needs(vit, batch):
    task = CFTTask(vit, CFTConfig())
    assert task.needs == {"double_backward_input"}
    with pytest.raises(ConfigError, match="cannot be weighted") as error:
        task.configure_stage(_stage({"cls": 1.0, "empty_concept": 1.0}))
    assert error.value.field == "stages.finetune.loss_weights"
    with pytest.raises(ConfigError) as error:
        task.configure_stage(_stage({"cls": 1.0}, relevance="rolout"))
    assert error.value.field == "stages.finetune.settings.relevance"
    task.configure_stage(_stage({"cls": 1.0, "concept": 0.4}, relevance="rollout"))
    assert task.config.relevance == "rollout" and task.base_config.relevance == "attnlrp"
    task.configure_stage(_stage({"cls": 0.2}))  # the control (lambda_align = 0): no relevance, no double backward
    assert task.needs == frozenset()


def test_param_groups_split_the_head_from_the_backbone(vit):
    groups = CFTTask(vit).param_groups()
    check_param_groups(groups, vit)
    assert groups["head"] == list(vit.model.head.parameters())
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(vit.parameters()))


def test_a_cnn_is_refused_for_token_methods_and_runs_input_gradient():
    with pytest.raises(ConfigError, match=r"methods that work on it: \['input_gradient'\]") as error:
        build_cft_task(ModelConfig("timm/test_resnet"), CFTConfig(relevance="gae"))
    assert error.value.field == "method.relevance"
    task = build_cft_task(ModelConfig("timm/test_resnet"), CFTConfig(relevance="input_gradient"))
    with pytest.raises(ConfigError) as error:
        task.configure_stage(_stage({"concept": 1.0}, relevance="attnlrp"))
    assert error.value.field == "stages.finetune.settings.relevance"
    mask = torch.zeros(1, 1, 160, 160, dtype=torch.uint8)
    mask[..., 40:120, 40:120] = 1
    losses = task({"image": torch.rand(1, 3, 160, 160), "label": torch.tensor([3]), "mask": mask})
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    "config",
    [CFTConfig(), CFTConfig(relevance="gae", loss_resolution="pixel", normalize="all_pixels", cls_target="label")],
    ids=["paper", "code"],
)
def test_one_training_step_of_the_tiny_vit(config):
    torch.manual_seed(0)
    task = build_cft_task(ModelConfig("timm/tiny-vit"), config)
    task.configure_stage(_stage(config.loss_weights()))
    gen = torch.Generator().manual_seed(4)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=gen), "label": torch.tensor([1, 7]), "mask": _masks(2)}
    before = [p.detach().clone() for p in task.parameters()]
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    losses = task(batch)
    total = sum(weight * losses[name] for name, weight in config.loss_weights().items())
    total.backward()
    optimizer.step()
    assert torch.isfinite(total)
    assert all(not torch.equal(b, p) for b, p in zip(before, task.parameters(), strict=True))
