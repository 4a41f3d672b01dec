"""timm's model API for pLSTM-ViT and LightNet-ViT, in the spirit of timm's tests/test_models.py."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import mdlrnn  # noqa: F401  (registers the models)
from mdlrnn.testing import relative_error

FAMILIES = ["plstm_vit_tiny_patch16_224", "lightnet_vit_tiny_patch16_224"]
SMALL = dict(img_size=64, embed_dim=32, depth=4, num_heads=2)  # a 4x4 token grid


def small(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, "num_classes": 10, **kwargs})


@pytest.mark.parametrize("name", FAMILIES + [n.replace("tiny", s) for n in FAMILIES for s in ("small", "base")])
def test_registered_and_default_cfg(name):
    assert name in timm.list_models("*_vit_*")
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    model = timm.create_model(name, pretrained=False, **SMALL)
    assert model.pretrained_cfg["first_conv"] + ".weight" in dict(model.named_parameters())
    assert model.pretrained_cfg["classifier"] == "head" and model.get_classifier() is model.head


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_backward_every_parameter(name):
    model = small(name, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", FAMILIES)
def test_features_head_and_classifier(name):
    model = small(name).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 4, 4, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.head_hidden_size == 4 * model.num_features  # corner pooling
    assert torch.equal(model.forward_head(features), model(x))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0, "avg")
    assert model(x).shape == (2, model.num_features) == (2, model.head_hidden_size)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 4, 4, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_and_intermediates(name):
    model = small(name).eval()
    x = torch.randn(2, 3, 64, 64)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == 4 and all(t.shape == (2, 32, 4, 4) for t in intermediates)
    assert torch.allclose(final, model.forward_features(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NHWC")
    assert [t.shape for t in last_two] == [(2, 4, 4, 32)] * 2
    assert torch.allclose(last_two[1].permute(0, 3, 1, 2), intermediates[-1])

    features = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL)
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")}, strict=False)
    maps = features(x)
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [16, 16]
    assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 2

    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.blocks) == 2 and isinstance(model.head, torch.nn.Identity)
    assert torch.allclose(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], intermediates[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_param_groups_no_weight_decay_checkpointing(name):
    model = small(name)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) > 1
    assert "pos_embed" in model.no_weight_decay()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    assert torch.allclose(plain, checkpointed, atol=1e-6)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_constructor_arguments(name):
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_argument=3)
    model = timm.create_model(name, dtype=torch.float64, **SMALL)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model = timm.create_model(name, device="meta", **SMALL)
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):
        model = timm.create_model(name, **SMALL)
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()
    fresh = timm.create_model(name, **SMALL)  # init_weights gives what construction gives
    for (key, after), before in zip(model.state_dict().items(), fresh.state_dict().values()):
        if any(part in key for part in ("gate.bias", "direct", "decay", "norm", "mlp.fc1.bias", "head.bias")):
            assert torch.allclose(after, before), key  # the deterministic initial values


@pytest.mark.parametrize("name", FAMILIES)
def test_any_input_resolution(name):
    model = small(name).eval()
    for size in [(48, 48), (96, 96), (64, 112), (80, 32)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 10), size
        assert model.forward_features(torch.randn(1, 3, *size)).shape[1:3] == (size[0] // 16, size[1] // 16)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize("name", FAMILIES)
def test_training_after_evaluation_under_inference_mode(name):
    """Validation under torch.inference_mode (as Lightning runs it), then training at that size: the index tables
    cached by the first call must not be inference tensors, which autograd cannot save."""
    model = small(name)
    x = torch.randn(2, 3, 80, 144)  # a 5x9 token grid no other test uses, so the first call builds its tables
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", FAMILIES)
def test_registered_tiny_runs_at_other_resolutions(name):
    model = timm.create_model(name, num_classes=3).eval()
    with torch.no_grad():
        for size in [(192, 192), (384, 384), (512, 512), (160, 224)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 3)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16(name):
    model = small(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    half = small(name).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16
    assert relative_error(half(x.bfloat16()), small(name)(x)) < 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_safetensors_round_trip_and_pretrained_file(name, tmp_path):
    model = small(name).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = timm.create_model(name, **{**SMALL, "num_classes": 10})
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh.eval()(x), model(x))
    loaded = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **{**SMALL, "num_classes": 10}
    ).eval()
    assert torch.equal(loaded(x), model(x))
    # a checkpoint made at another resolution: the position embedding is resampled
    larger = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                               **{**SMALL, "img_size": 96, "num_classes": 10})
    assert larger.pos_embed.shape[1:3] == (6, 6)


def test_compile_matches_eager():
    model = small("plstm_vit_tiny_patch16_224", depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(torch.compile(model)(x), model(x)) < 1e-5
