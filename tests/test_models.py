"""The model zoo: exact parameter counts, forward/backward, NormAct backends, registry, CLI."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from typer.testing import CliRunner

from fastcifar.cli import app
from fastcifar.errors import UserError
from fastcifar.models import (NormAct, count_params, create_model, forward_flops, get_model_info, get_recipe,
                              list_models, model_names, set_bn_backend)
from fastcifar.models.resnet import ResNet
from fastcifar.recipe import Recipe


def _has_triton_bn() -> bool:
    try:
        import kernels
    except ImportError:
        return False
    return hasattr(kernels, "bn_relu")


needs_triton = pytest.mark.skipif(not _has_triton_bn(), reason="kernels.bn_relu is not available")
BACKENDS = ["eager", "compiled", pytest.param("triton", marks=needs_triton)]


def _device_for(*backends) -> torch.device:
    """Where a test of these backends runs: the triton backend needs CUDA tensors on a GPU
    machine (the interpreter that runs it on CPU tensors is only switched on without one)."""
    return torch.device("cuda" if "triton" in backends and torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """on a GPU, TF32 convolutions would swamp the backend comparisons"""

# ---------------------------------------------------------------------------------------------
# Parameter counts, computed here from the architecture descriptions (not from the models)


def conv(cin, cout, k, groups=1):
    return cin * cout * k * k // groups


def bn(c):
    return 2 * c  # weight + bias


def basic_block(cin, cout, stride):
    n = conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
    if stride != 1 or cin != cout:
        n += conv(cin, cout, 1) + bn(cout)
    return n


def resnet_count(stem, widths, blocks, classes=10):
    n, cin = conv(3, stem, 3) + bn(stem), stem
    for i, (w, b) in enumerate(zip(widths, blocks)):
        for j in range(b):
            n += basic_block(cin, w, 2 if i and j == 0 else 1)
            cin = w
    return n + cin * classes + classes


def se_count(c, r=16, bias=True):
    return 2 * c * (c // r) + ((c // r) + c if bias else 0)


def dense_se_count(stem=16, widths=(64, 128, 256), blocks=6, shared_stage=2, classes=10):
    n, cin = conv(3, stem, 3) + bn(stem), stem
    for i, w in enumerate(widths):
        shared_done = False
        for j in range(blocks):
            stride = 2 if i and j == 0 else 1
            # conv1 (cin -> w, strided in block 1) and conv2 (w -> w); in the sharing stage every
            # w -> w, stride-1 conv uses one kernel, counted once
            for k_in, square in ((cin, cin == w and stride == 1), (w, True)):
                if i == shared_stage and square:
                    n += 0 if shared_done else conv(w, w, 3)
                    shared_done = True
                else:
                    n += conv(k_in, w, 3)
            n += 2 * bn(w) + se_count(w, bias=False)
            if stride != 1 or cin != w:
                n += conv(cin, w, 1) + bn(w)
            cin = w
    return n + cin * classes + classes


def dropout_resnet_count(stem=16, widths=(64, 128, 256), blocks=(3, 5, 3), classes=10):
    n, cin = conv(3, stem, 3) + bn(stem), stem
    for i, (w, b) in enumerate(zip(widths, blocks)):
        for j in range(b):
            stride = 2 if i and j == 0 else 1
            n += conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            if stride != 1 or cin != w:
                n += conv(w, w, 1) + bn(w)  # the cout->cout shortcut of the report's table
            cin = w
    return n + cin * classes + classes


def resnext_count(stem=32, blocks=(3, 3, 3), card=32, width=4, classes=10):
    n, cin = conv(3, stem, 1) + bn(stem), stem
    for i, b in enumerate(blocks):
        gw = card * width * 2 ** i
        for j in range(b):
            stride = 2 if i and j == 0 else 1
            n += conv(cin, gw, 1) + bn(gw) + conv(gw, gw, 3, groups=card) + bn(gw) + conv(gw, 2 * gw, 1) + bn(2 * gw)
            if stride != 1 or cin != 2 * gw:
                n += conv(cin, 2 * gw, 1) + bn(2 * gw)
            cin = 2 * gw
    return n + cin * classes + classes


# name -> (count from the description, the figure the report prints, or the docstring's derivation)
EXPECTED = {
    "resnet_2111": (resnet_count(64, (64, 128, 256, 512), (2, 1, 1, 1)), 4_977_226),
    "resnet_6543": (resnet_count(32, (32, 64, 128, 256), (6, 5, 4, 3)), 4_865_322),
    "resnet_343w66": (resnet_count(66, (66, 132, 264), (3, 4, 3)), 4_916_284),
    "se_resnet_443": (resnet_count(64, (64, 128, 256), (4, 4, 3)) + se_count(64), 4_697_742),
    "se_resnet_666_shared": (dense_se_count(), 3_116_378),
    "resnet_353_dropout": (dropout_resnet_count(), 4_934_746),
    "resnext29_32x4d": (resnext_count(), 4_761_770),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_param_count_exact(name):
    from_description, figure = EXPECTED[name]
    assert from_description == figure
    info = get_model_info(name)
    assert count_params(create_model(name)) == figure
    assert info.params == figure
    if info.published_params is not None:
        assert info.published_params == figure


def _hand_counted_flops(model: nn.Module) -> int:
    """2 x multiply-adds of every convolution and linear layer over one image, from each layer's
    output shape, input channels per group and kernel: an independent count to check
    forward_flops against (grouped convolutions included)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", model_names())
def test_forward_flops_match_a_hand_count(name):
    flops = forward_flops(name)
    assert flops == _hand_counted_flops(create_model(name))
    assert 0.2e9 < flops < 3e9   # CIFAR ResNets under 5M parameters: tenths of a GFLOP to a few


def test_forward_flops_follow_model_options():
    narrow = forward_flops("speedrun_net", widths=[16, 32, 64, 64])       # a list, as --model-opt gives it
    assert narrow == _hand_counted_flops(create_model("speedrun_net", widths=[16, 32, 64, 64]))
    assert narrow < forward_flops("speedrun_net") / 3


def test_every_report_model_is_counted():
    infos = {i.name: i for i in list_models() if i.report}
    assert set(infos) == set(EXPECTED)
    for i in infos.values():
        assert re.fullmatch(r"00[0-4]_[0-9a-f]{16}\.txt", i.report) and i.title
        assert i.recipe.tag == "report" and i.recipe.sources
    assert {i.report for i in infos.values()} == {"000_29b2964ca4a6d86d.txt", "001_d2e037756061fb24.txt",
                                                 "002_93fe5a1e91242796.txt", "003_fc50290cd2998d11.txt",
                                                 "004_9a17163d1e54e00e.txt"}


def test_stage3_kernel_is_shared():
    model = create_model("se_resnet_666_shared")
    stage3 = model.layers[2]
    weights = [m.weight for m in stage3.modules() if isinstance(m, nn.Conv2d) and m.weight.shape == (256, 256, 3, 3)]
    assert len(weights) == 11 and all(w is weights[0] for w in weights)
    model.to(memory_format=torch.channels_last)
    weights = [m.weight for m in stage3.modules() if isinstance(m, nn.Conv2d) and m.weight.shape == (256, 256, 3, 3)]
    assert all(w is weights[0] for w in weights)
    # one step keeps them one tensor: the shared kernel sums the gradients of all its uses
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert all(w is weights[0] for w in weights)
    assert count_params(model) == 3_116_378


# ---------------------------------------------------------------------------------------------
# Forward and backward


@pytest.mark.parametrize("name", model_names())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    out = model(x)
    assert out.shape == (2, 10) and out.dtype == torch.float32
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname

    # channels-last gives the same function (eval mode: no dropout, running statistics);
    # 16x16 inputs keep this CPU test quick, every model pools globally
    x = x[:, :, 8:24, 8:24].contiguous()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.to(memory_format=torch.channels_last))
    assert out_cl.shape == (2, 10)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    model_cl.train()
    model_cl.zero_grad()
    model_cl(x.to(memory_format=torch.channels_last)).square().mean().backward()
    for pname, p in model_cl.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_model_options():
    model = create_model("resnet_353_dropout", dropout=0.1)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}
    with pytest.raises(UserError, match="no option"):
        create_model("resnet_2111", dropout=0.1)


# ---------------------------------------------------------------------------------------------
# NormAct


ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, None: nn.Identity}


def _reference_step(bn_ref, x, residual, act):
    y = bn_ref(x)
    if residual is not None:
        y = y + residual
    return ACT_MODULES[act]()(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,with_residual,momentum", [
    ("relu", False, 0.1), (None, False, 0.1), ("relu", True, 0.1), ("relu", True, None),
    ("gelu", False, 0.1), ("gelu", True, 0.1), (None, True, 0.1)])
def test_normact_matches_batchnorm(backend, act, with_residual, momentum):
    torch.manual_seed(0)
    C = 6
    ref = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    mod = NormAct(C, act=act, momentum=momentum)
    mod.load_state_dict(ref.state_dict())
    mod.backend = backend
    dev = _device_for(backend)
    ref.to(dev), mod.to(dev)
    for step in range(3):
        x = (torch.randn(4, C, 5, 5) * (step + 1) + step).to(dev).requires_grad_()
        r = torch.randn(4, C, 5, 5).to(dev).requires_grad_() if with_residual else None
        x2 = x.detach().clone().requires_grad_()
        r2 = r.detach().clone().requires_grad_() if with_residual else None
        y = mod(x, r)
        y_ref = _reference_step(ref, x2, r2, act)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
        if with_residual:
            torch.testing.assert_close(r.grad, r2.grad)
        torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mod.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    mod.eval()
    ref.eval()
    x = torch.randn(3, C, 4, 4).to(dev)
    r = torch.randn(3, C, 4, 4).to(dev) if with_residual else None
    with torch.no_grad():
        torch.testing.assert_close(mod(x, r), _reference_step(ref, x, r, act), rtol=1e-5, atol=1e-5)
    assert mod.num_batches_tracked.item() == 3  # eval does not count


class TorchBNAct(nn.BatchNorm2d):
    """The reference build's layer: torch's own BatchNorm2d.forward, then ``+ residual``, then
    nn.ReLU / nn.GELU; same call signature as NormAct."""

    def __init__(self, num_features: int, act="relu", eps: float = 1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act = ACT_MODULES[act]()

    def forward(self, x, residual=None):
        y = nn.BatchNorm2d.forward(self, x)
        return self.act(y if residual is None else y + residual)


def torch_bn_build(model):
    """``model`` with every NormAct replaced by a TorchBNAct holding the same state."""
    for name, child in list(model.named_children()):
        if isinstance(child, NormAct):
            ref = TorchBNAct(child.num_features, act=child.act, eps=child.eps, momentum=child.momentum)
            ref.load_state_dict(child.state_dict())
            ref.train(child.training)
            setattr(model, name, ref)
        else:
            torch_bn_build(child)
    return model


def test_normact_state_dict_keys_are_batchnorm_keys():
    assert NormAct(8).state_dict().keys() == nn.BatchNorm2d(8).state_dict().keys()
    assert NormAct(8, backend="compiled").state_dict().keys() == nn.BatchNorm2d(8).state_dict().keys()
    assert TorchBNAct(8, act="relu").state_dict().keys() == nn.BatchNorm2d(8).state_dict().keys()


# ---------------------------------------------------------------------------------------------
# torch.compile, and state dicts across backends


def _tiny(seed=0):
    torch.manual_seed(seed)
    return ResNet(widths=(8, 16), blocks=(1, 1))


def _train_step(model, x, y, lr=0.05):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return loss.detach()


def _data(seed=1, n=4, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_torch_compile_agrees_with_eager():
    x, y = _data()
    eager = _tiny()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    loss_e = _train_step(eager, x, y)
    loss_c = _train_step(compiled, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled_src.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend,act", [("eager", "relu"), ("compiled", "relu"), ("compiled", "gelu"),
                                         pytest.param("triton", "relu", marks=needs_triton),
                                         pytest.param("triton", "gelu", marks=needs_triton)])
def test_compiles_once(backend, act):
    """A compiled zoo model compiles on its first training step and its first eval pass and
    never again, whatever the BN backend (the compiled backend's inner functions exist before
    the outer model is traced, so its graph's guards on them hold from the second step on)."""
    dev = _device_for(backend)
    # each case compiles the same forward code again; past dynamo's per-code recompile limit it
    # would silently run eager (no frames to count), so every case starts from empty caches
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("speedrun_net", widths=[8, 16, 16, 16], logit_scale=1.0, bn_backend=backend,
                         act=act).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randn(2, 3, 16, 16, device=dev), torch.tensor([1, 7], device=dev)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        opt.step()

    def evaluate():
        model.eval()
        with torch.no_grad():
            compiled(x)

    train()
    evaluate()
    frames = counter.frame_count
    assert frames > 0
    for step in (train, train, evaluate, train):
        step()
        assert counter.frame_count == frames, f"recompiled in {step.__name__}"


@pytest.mark.parametrize("src,dst", [("eager", "compiled"), ("compiled", "eager"),
                                     pytest.param("eager", "triton", marks=needs_triton),
                                     pytest.param("triton", "eager", marks=needs_triton)])
def test_state_dict_round_trip_across_backends(src, dst):
    dev = _device_for(src, dst)
    x, y = (t.to(dev) for t in _data())
    a = set_bn_backend(_tiny(0).to(dev), src)
    for _ in range(2):
        _train_step(a, x, y)
    b = set_bn_backend(_tiny(1).to(dev), dst)
    b.load_state_dict(a.state_dict())
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t, u), name
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)
    # training on from the loaded state keeps both in step, running statistics included
    x2, y2 = (t.to(dev) for t in _data(seed=2))
    torch.testing.assert_close(_train_step(b, x2, y2), _train_step(a, x2, y2), rtol=1e-4, atol=1e-5)
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, t, rtol=1e-4, atol=1e-5, msg=name)


def _vanilla(model):
    """The model with every NormAct replaced by a bare nn.BatchNorm2d (for its state_dict only)."""
    for name, child in list(model.named_children()):
        if isinstance(child, NormAct):
            setattr(model, name, nn.BatchNorm2d(child.num_features))
        else:
            _vanilla(child)
    return model


@pytest.mark.parametrize("name", ["resnet_2111", "se_resnet_666_shared", "resnet_353_dropout", "resnext29_32x4d"])
def test_state_dict_loads_into_plain_batchnorm_build(name):
    torch.manual_seed(0)
    fused = create_model(name)
    plain = torch_bn_build(create_model(name))
    assert not any(isinstance(m, NormAct) for m in plain.modules())
    assert any(isinstance(m, TorchBNAct) for m in plain.modules())

    vanilla = _vanilla(create_model(name))
    assert all(type(m) is not NormAct for m in vanilla.modules())
    sd_fused, sd_vanilla = fused.state_dict(), vanilla.state_dict()
    assert list(sd_fused) == list(sd_vanilla)
    assert all(sd_fused[k].shape == sd_vanilla[k].shape and sd_fused[k].dtype == sd_vanilla[k].dtype
               for k in sd_fused)
    vanilla.load_state_dict(sd_fused)

    x = torch.randn(2, 3, 32, 32)
    fused.train()
    fused(x)  # move the running statistics off their initial values
    plain.load_state_dict(fused.state_dict())
    fused.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), fused(x), rtol=1e-4, atol=1e-4)
    fused.load_state_dict(plain.state_dict())  # and back


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'resnet_9000'.*resnet_2111"):
        create_model("resnet_9000")
    with pytest.raises(UserError, match="unknown model"):
        get_model_info("resnet_9000")


def test_unknown_backend():
    with pytest.raises(UserError, match="unknown BN backend 'cudnn'"):
        create_model("resnet_2111", bn_backend="cudnn")
    model = _tiny()
    with pytest.raises(UserError, match="unknown BN backend"):
        set_bn_backend(model, "fused")
    with pytest.raises(UserError, match="unknown BN backend"):   # at once, not at the next forward
        model.bn1.backend = "fused"
    with pytest.raises(UserError, match="unknown BN backend"):
        NormAct(8, backend="fused")
    with pytest.raises(UserError, match="unknown activation 'silu'"):
        NormAct(8, act="silu")
    assert model.bn1.backend == "eager"
    model(torch.randn(2, 3, 8, 8))


def test_triton_backend_without_kernel(monkeypatch):
    import kernels

    monkeypatch.delattr(kernels, "bn_relu", raising=False)
    with pytest.raises(UserError, match="kernels.bn_relu"):
        create_model("resnet_2111", bn_backend="triton")
    model = _tiny()
    with pytest.raises(UserError, match="kernels.bn_relu"):
        model.bn1.backend = "triton"
    assert model.bn1.backend == "eager"


# ---------------------------------------------------------------------------------------------
# Recipes


def test_recipes():
    fields = {f.name for f in dataclasses.fields(Recipe)}
    for name in model_names():
        if not get_model_info(name).report:  # own design: a fast recipe only
            with pytest.raises(UserError, match="no report recipe"):
                get_recipe(name, "report")
            assert get_recipe(name, "fast").tag == "fast"
            continue
        report, fast = get_recipe(name, "report"), get_recipe(name, "fast")
        assert report.tag == "report" and fast.tag == "fast"
        assert set(report.sources) <= fields
        assert Recipe.from_dict(report.to_dict()) == report
        report.sources["epochs"] = "changed"  # a copy: the registry is untouched
        assert get_recipe(name, "report").sources.get("epochs") != "changed"
    assert get_recipe("resnext29_32x4d").amp_epsilon == 0.5
    assert get_recipe("se_resnet_443").lookahead_k == 5
    assert get_recipe("resnet_2111").grad_clip_value == 0.1
    with pytest.raises(UserError, match="unknown recipe tag"):
        get_recipe("resnet_2111", "slow")


@pytest.mark.skipif(not os.environ.get("FASTCIFAR_REPORTS_DIR"),
                    reason="set FASTCIFAR_REPORTS_DIR to the folder of the report .txt files")
def test_recipe_sources_quote_the_reports():
    folder = Path(os.environ["FASTCIFAR_REPORTS_DIR"])
    norm = lambda t: re.sub(r"\s+", " ", t).strip()  # noqa: E731
    for info in list_models():
        if not info.report:
            continue
        text = norm((folder / info.report).read_text())
        for field, source in info.recipe.sources.items():
            for part in re.split(r'"; (?=(?:Figure [^:]*: )?")', source):
                quote = re.sub(r"^Figure [^:]*: ", "", part).strip().strip('"')
                assert norm(quote) in text, (info.name, field, quote)


# ---------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name, (_, figure) in EXPECTED.items():
        line = next(l for l in result.output.splitlines() if l.startswith(name + " "))
        assert f"{figure:,}" in line
    assert "004_9a17163d1e54e00e.txt" in result.output


def test_recipe_summary_names_the_optimizer_extras():
    from fastcifar.models.table import recipe_summary
    from fastcifar.recipe import Recipe
    text = recipe_summary(Recipe(optimizer="muon", muon_lr=0.1, bias_lr_scale=64.0), False)
    assert "muon lr 0.1" in text and "bias lr x64" in text
    plain = recipe_summary(Recipe(), False)
    assert "muon" not in plain and "bias lr" not in plain


def test_cli_json():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {m["name"]: m for m in json.loads(result.output)["models"]}
    assert set(EXPECTED) <= set(rows)
    for name, (_, figure) in EXPECTED.items():
        assert rows[name]["params"] == figure
        assert rows[name]["params_match_published"] in (True, None)
        assert rows[name]["forward_flops"] == forward_flops(name)
    assert rows["resnet_2111"]["recipe"]["optimizer"] == "adam"


def test_cli_recipe():
    result = runner.invoke(app, ["models", "--recipe", "resnet_2111"])
    assert result.exit_code == 0, result.output
    epochs = next(l for l in result.output.splitlines() if l.strip().startswith("epochs "))
    assert "70" in epochs and "[report]" in epochs and "epochs = 70" in epochs
    batch = next(l for l in result.output.splitlines() if l.strip().startswith("batch_size "))
    assert "not stated" in batch
    result = runner.invoke(app, ["models", "--recipe", "resnet_2111", "--json"])
    assert json.loads(result.output)["recipe"]["epochs"] == 70
    result = runner.invoke(app, ["models", "--recipe", "resnet_9000"])
    assert isinstance(result.exception, UserError)
