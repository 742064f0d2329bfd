"""speedrun_net: exact size, forward/backward, frozen BN scales, and the pooling trick it relies on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.models import create_model, get_model_info, get_recipe
from fastcifar.models.norm import NormAct
from fastcifar.models.speedrun_net import Block


def _expected_params(w0=32, w1=64, w2=256, w3=256, stem="whiten"):
    def block(ci, co):
        return ci * co * 9 + co * co * 9 + 2 * co      # two convs, two BN shifts (scales frozen)
    if stem == "whiten":
        w0, stem_weights = 24, 0                       # fixed filters: nothing trainable but the BN shift
    else:
        stem_weights = 3 * w0 * 9
    return stem_weights + w0 + block(w0, w1) + block(w1, w2) + block(w2, w3) + w3 * 10


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_param_count_and_registry():
    info = get_model_info("speedrun_net")
    assert info.params == _expected_params() == 1_971_352
    assert info.published_acc is None and info.published_params is None
    fast = get_recipe("speedrun_net", "fast")
    assert fast.tag == "fast" and fast.epochs >= 1 and fast.tta == "flip_translate" and fast.alternate_flip
    assert fast.bias_lr_scale == 64.0
    assert _trainable(create_model("speedrun_net", widths=(8, 16, 32, 32))) == _expected_params(8, 16, 32, 32)
    conv = create_model("speedrun_net", widths=(8, 16, 32, 32), stem="conv")
    assert _trainable(conv) == _expected_params(8, 16, 32, 32, stem="conv")
    assert _trainable(create_model("speedrun_net", stem="conv")) == 1_976_832      # the first design


def test_forward_backward_batch_2():
    torch.manual_seed(0)
    model = create_model("speedrun_net").train()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 7]), label_smoothing=0.2).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        elif name != "stem.conv.weight":  # the BatchNorm scales, fixed at 1
            assert name.endswith("weight") and p.grad is None and torch.all(p == 1), name
    bn = [m for m in model.modules() if isinstance(m, NormAct)]
    assert len(bn) == 7 and all(not m.weight.requires_grad and m.bias.requires_grad for m in bn)
    assert model.stem.conv.weight.grad is None                             # the whitening filters: fixed


def test_pool_first_equals_pool_last_with_unit_bn_scale():
    """Block pools before BN-ReLU; with BN's scale fixed at 1 (an increasing map) that is the same
    function as pooling after them, for fixed statistics (eval mode)."""
    torch.manual_seed(0)
    block = create_model("speedrun_net", stem="conv").block1.eval()
    assert isinstance(block, Block)
    with torch.no_grad():
        block.norm1.bias.normal_()
        block.norm1.running_mean.normal_()
        block.norm1.running_var.uniform_(0.5, 2.0)
        y = block.conv1(torch.randn(4, 32, 16, 16))
        pool_first = block.norm1(block.pool(y))
        pool_last = block.pool(block.norm1(y))
    torch.testing.assert_close(pool_first, pool_last)


def _bn(norm, x):
    """Eval-mode BatchNorm from the module's statistics and parameters, written out."""
    shape = (1, -1, 1, 1)
    return ((x - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
            * norm.weight.view(shape) + norm.bias.view(shape))


@pytest.mark.parametrize("stem,residual,act,stem_norm", [
    ("whiten", True, "relu", True), ("conv", True, "relu", True), ("whiten", False, "relu", True),
    ("whiten", True, "gelu", True), ("whiten", True, "gelu", False), ("conv", True, "relu", False)])
def test_forward_is_the_documented_layout(stem, residual, act, stem_norm):
    """Eval-mode forward against the layout in the module docstring, written with functional ops:
    stem (2x2 whitening conv without padding, or conv3x3) then BN-ReLU; per block conv, 2x2 max
    pool, BN-ReLU, conv, BN, + skip (unless residual=False), ReLU; global max pool, bias-free
    linear, times logit_scale. act="gelu" puts GELU wherever ReLU was; stem_norm=False gives the
    stem conv a bias in place of the BN after it."""
    torch.manual_seed(0)
    model = create_model("speedrun_net", widths=(8, 16, 16, 16), stem=stem, residual=residual,
                         act=act, stem_norm=stem_norm).eval()
    f = F.relu if act == "relu" else F.gelu
    if stem == "whiten":
        model.init_from_data(_correlated_images(8))
    with torch.no_grad():
        for m in model.modules():   # statistics and shifts away from their initial values
            if isinstance(m, NormAct):
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(3, 3, 32, 32)
        conv = model.stem.conv if stem == "whiten" else model.stem
        if stem_norm:
            assert conv.bias is None
            norm = lambda z: _bn(model.stem_norm, z)    # noqa: E731
        else:
            assert not any(isinstance(m, NormAct) for m in (model.stem, model.stem_norm))
            assert conv.bias.requires_grad and not conv.bias.any()      # trained, from zero
            conv.bias.normal_()
            norm = lambda z: z + conv.bias.view(1, -1, 1, 1)    # noqa: E731
        h = f(norm(F.conv2d(x, conv.weight, padding=0 if stem == "whiten" else 1)))
        if stem == "whiten":
            assert h.shape[1:] == (24, 31, 31)
        for block in (model.block1, model.block2, model.block3):
            h = f(_bn(block.norm1, F.max_pool2d(F.conv2d(h, block.conv1.weight, padding=1), 2)))
            h = f(_bn(block.norm2, F.conv2d(h, block.conv2.weight, padding=1)) + (h if residual else 0))
        assert h.shape[-2:] == ((3, 3) if stem == "whiten" else (4, 4))
        want = h.amax(dim=(2, 3)) @ model.fc.weight.T * model.logit_scale
        got = model(x)
    assert model.fc.bias is None and model.logit_scale == 0.125
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)



def test_compiled_backward_has_no_aten_pooling_fallback():
    """torch.compile has no fused backward for adaptive max pooling: it calls ATen's, which on a
    GPU scatters the gradient with atomic adds (161 us of speedrun_net's 3.5 ms H100 step). The
    head's global max pool must compile to ops inductor fuses; the compiled step's profile names
    every op inductor left to ATen."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = create_model("speedrun_net", widths=(8, 16, 16, 16)).train()
    net = torch.compile(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    step()   # compiles
    with profile() as prof:
        step()
    names = {e.name for e in prof.events()}
    assert any("max_pool2d" in n or "Compiled" in n for n in names), sorted(names)  # the profile saw the step
    assert not [n for n in names if "adaptive_max_pool" in n], sorted(names)
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()

# ---- the whitening stem ------------------------------------------------------------------------------

def _correlated_images(n=64, seed=0):
    """Smooth, colour-correlated images: patches far from white, as real ones are."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.randn(n, 1, 36, 36, generator=g), 5, 1)          # spatially smooth
    colour = torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    return base * colour + 0.05 * torch.randn(n, 3, 32, 32, generator=g) + 0.3


def test_whitening_stem_whitens_the_patches_it_was_given():
    from fastcifar.models.speedrun_net import PatchWhitening

    images = _correlated_images()
    stem = PatchWhitening(3, 2, eps=0.0)
    before = stem(images)
    stem.init_from_data(images)
    out = stem(images).double()
    assert out.shape == (64, 24, 31, 31) and before.shape == out.shape
    z = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])              # both signs of each filter
    raw = torch.cov(images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).T.double())
    assert torch.linalg.cond(raw) > 50                                     # the input was far from white
    assert not stem.conv.weight.requires_grad


def test_gelu_keeps_the_weights_and_refuses_unknown_activations():
    from fastcifar.errors import UserError

    torch.manual_seed(0)
    relu = create_model("speedrun_net")
    torch.manual_seed(0)
    gelu = create_model("speedrun_net", act="gelu")
    assert relu.state_dict().keys() == gelu.state_dict().keys()     # checkpoints interchange
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), gelu.state_dict().values()))
    # the activation is fused into every NormAct; no separate activation module is left
    assert {m.act for m in gelu.modules() if isinstance(m, NormAct)} == {"gelu"}
    assert {m.act for m in relu.modules() if isinstance(m, NormAct)} == {"relu"}
    assert not any(isinstance(m, (nn.GELU, nn.ReLU)) for m in gelu.modules())
    with pytest.raises(UserError, match="unknown activation 'silu'"):
        create_model("speedrun_net", act="silu")


def test_bn_momentum_and_eps_reach_every_batchnorm():
    """bn_momentum / bn_eps (airbench94's 0.4 / 1e-12) set every NormAct, and one training
    step moves the running mean by that momentum towards the batch's mean."""
    from fastcifar.errors import UserError

    model = create_model("speedrun_net", bn_momentum=0.4, bn_eps=1e-12).train()
    norms = [m for m in model.modules() if isinstance(m, NormAct)]
    assert len(norms) == 7 and {(m.momentum, m.eps) for m in norms} == {(0.4, 1e-12)}
    assert {(m.momentum, m.eps) for m in create_model("speedrun_net").modules()
            if isinstance(m, NormAct)} == {(0.1, 1e-5)}
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        feats = model.stem(x)
    before = model.stem_norm.running_mean.clone()
    model(x)
    assert torch.allclose(model.stem_norm.running_mean, 0.6 * before + 0.4 * feats.mean((0, 2, 3)), atol=1e-6)
    with pytest.raises(UserError, match="bn_momentum must be in"):
        create_model("speedrun_net", bn_momentum=0.0)
    with pytest.raises(UserError, match="bn_eps must be positive"):
        create_model("speedrun_net", bn_eps=-1.0)


def test_whiten_stem_model_shapes_flops_and_bad_stem():
    from fastcifar.errors import UserError
    from fastcifar.models import forward_flops

    model = create_model("speedrun_net", stem="whiten").train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.stem_norm.num_features == 24 and model.block1.conv1.in_channels == 24
    assert 0.7 < forward_flops("speedrun_net", stem="whiten") / forward_flops("speedrun_net", stem="conv") < 0.85
    with pytest.raises(UserError, match="unknown stem 'pca'"):
        create_model("speedrun_net", stem="pca")


@pytest.mark.parametrize("loader", ["gpu", "ffcv"])   # images from the loader's device copy / the file
def test_training_initialises_the_whitening_stem_from_the_first_training_images(loader, tmp_path, monkeypatch):
    from beton_data import read_beton
    from beton_data.augment import normalize
    from fastcifar.models.speedrun_net import PatchWhitening, SpeedrunNet
    from fastcifar.train import INIT_IMAGES, TrainConfig, train
    from train_helpers import make_data, small_config

    data = make_data(tmp_path / "data")
    cfg = small_config(data, tmp_path / "run", max_steps=3, overrides={"ema": 0.9}, loader=loader)
    cfg.model_options["stem"] = "whiten"
    first = train(cfg)
    assert first["status"] == "max_steps" and first["times"]["init_s"] > 0
    assert first["times"]["train_s"] >= first["times"]["init_s"]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    expected = PatchWhitening(3, 2)
    expected.init_from_data(normalize(torch.from_numpy(read_beton(data / "train.beton")[0][:INIT_IMAGES]),
                                      torch.float32))
    torch.testing.assert_close(ckpt["model"]["stem.conv.weight"], expected.conv.weight)   # frozen: as set
    # the weight average was copied after the initialisation, so it holds the same filters
    torch.testing.assert_close(ckpt["ema"]["stem.conv.weight"], expected.conv.weight)
    # a resumed run keeps the checkpoint's filters and does not initialise again
    calls = []
    monkeypatch.setattr(SpeedrunNet, "init_from_data", lambda self, images: calls.append(1))
    second = train(TrainConfig(resume=str(tmp_path / "run"), max_steps=5, progress=False))
    assert second["status"] == "max_steps" and calls == []


def test_identity_init_passes_the_input_channels_through_and_keeps_the_rest_random():
    torch.manual_seed(0)
    plain = create_model("speedrun_net")
    torch.manual_seed(0)
    model = create_model("speedrun_net", dirac_init=True)
    assert _trainable(model) == _trainable(plain)
    x = torch.randn(2, 64, 15, 15)
    conv = model.block2.conv1                                      # 64 -> 256
    y = conv(x)
    torch.testing.assert_close(y[:, :64], x)                       # the first 64 copy their input
    assert not torch.allclose(conv.weight[64:], torch.zeros_like(conv.weight[64:]))
    assert torch.equal(conv.weight[64:], plain.block2.conv1.weight[64:])   # the rest as before
    for block in (model.block1, model.block2, model.block3):
        torch.testing.assert_close(block.conv2(block.conv2.weight.new_ones(1, block.conv2.in_channels, 3, 3)),
                                   block.conv2.weight.new_ones(1, block.conv2.out_channels, 3, 3))
    # off by default: the plain model's convs are not the identity anywhere
    assert not torch.allclose(plain.block2.conv1(x)[:, :64], x)


def test_identity_init_refuses_a_narrowing_conv():
    from fastcifar.models.speedrun_net import identity_init_
    with pytest.raises(ValueError, match="out_channels >= in_channels"):
        identity_init_(torch.nn.Conv2d(8, 4, 3, padding=1))
