"""bench/bench_train.py --dry-run (tiny CPU mode), bench/bench_loaders.py's per-loader rows, and
bench/gpu_suite.sh (its argument check and the preflight stage on the CPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """bench/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_train():
    return _bench("bench_train")


def test_bench_train_dry_run(tmp_path, capsys):
    out = tmp_path / "bench_train.json"
    result = _bench_train().main(["--dry-run", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["kind"] == "bench_train" and stored["device"].startswith("CPU")
    assert stored["versions"]["torch"] and "--dry-run" in stored["command"] and stored["date"]
    assert [(r["model"], r["bn_backend"], r["loader"]) for r in stored["rows"]] == [
        ("speedrun_net", "eager", "ffcv"), ("speedrun_net", "eager", "gpu")]
    for r in stored["rows"]:
        assert "error" not in r, r
        assert r["batch_size"] == 8 and r["images_per_s"] > 0 and r["step_ms"] > 0
        assert 0 < r["data_wait_share"] < 1 and r["data_wait_ms"] > 0 and r["compile_warmup_s"] > 0
        assert r["peak_mem_mib"] is None  # no GPU memory on the CPU
        # speedrun_net: 0.24 GFLOP per forward pass, ~3x that per trained image
        assert 0.68 < r["train_gflop_per_image"] < 0.74
        assert r["achieved_tflops"] == pytest.approx(r["images_per_s"] * r["train_gflop_per_image"] / 1e3)
    assert stored["rows"] == result["rows"]
    assert "img/s" in capsys.readouterr().out


def test_bench_train_records_a_failing_configuration(tmp_path):
    out = tmp_path / "b.json"
    _bench_train().main(["--dry-run", "--loaders", "gpu", "--batch-size", "100", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert "fewer images than one batch" in row["error"]  # 64 synthetic images < one batch of 100


def test_bench_train_budget_skips_and_still_writes(tmp_path):
    out = tmp_path / "b.json"
    _bench_train().main(["--dry-run", "--budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["error"] == "skipped: --budget-s spent" for r in rows)


def test_bench_train_names_the_configuration_it_is_in(tmp_path, monkeypatch):
    """A process killed inside a configuration (a long compilation) leaves a file naming it;
    the finished file has no such entry."""
    monkeypatch.delenv("FASTCIFAR_COMPILE_CACHE", raising=False)
    bench = _bench_train()
    out = tmp_path / "b.json"
    seen = []
    real = bench.bench_model_backend

    def spy(model, backend, *a, **kw):
        seen.append(json.loads(out.read_text()).get("running"))
        return real(model, backend, *a, **kw)

    monkeypatch.setattr(bench, "bench_model_backend", spy)
    bench.main(["--dry-run", "--backends", "eager", "compiled", "--loaders", "gpu", "--out", str(out)])
    assert [(r["model"], r["bn_backend"]) for r in seen] == [("speedrun_net", "eager"), ("speedrun_net", "compiled")]
    assert seen[0]["started_s"] >= 0
    stored = json.loads(out.read_text())
    assert "running" not in stored and len(stored["rows"]) == 2
    assert stored["machine"]["versions"]["torch"] and "compile_cache" not in stored["machine"]


def test_bench_train_model_options(tmp_path):
    """--model-opt reaches the builder (a bad value fails the row, not the run) and is recorded;
    a malformed one is refused before any work."""
    out = tmp_path / "b.json"
    _bench_train().main(["--dry-run", "--loaders", "gpu", "--model-opt", "act=gelu", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["model_options"] == {"act": "gelu"} and "error" not in row and row["images_per_s"] > 0
    _bench_train().main(["--dry-run", "--loaders", "gpu", "--model-opt", "act=silu", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert "unknown activation 'silu'" in row["error"]
    with pytest.raises(SystemExit):
        _bench_train().main(["--dry-run", "--model-opt", "act", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_bench_train_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="unknown model"):
        _bench_train().main(["--dry-run", "--models", "no_such_net", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def _skipping_compile(monkeypatch):
    """torch.compile whose backend reports a graph it ran without CUDA graphs through inductor's
    own logging function (as inductor does on a GPU), then runs the graph eagerly."""
    import torch
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    def backend(gm, example_inputs):
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg0_1)")
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real(model, backend=backend))
    torch._dynamo.reset()


def test_benchmarks_report_graphs_run_without_cuda_graphs(tmp_path, monkeypatch, capsys):
    """Under --compile-mode reduce-overhead each row of bench_train and profile_step says how many
    graphs ran without CUDA graphs and why (such a row does not measure CUDA graphs), its
    printed line says so, and bench/report.py names the mode and marks the row; under the
    default mode rows have no such field."""
    import torch

    bench = _bench_train()
    data = bench.synthetic_data(tmp_path, n=64)
    _skipping_compile(monkeypatch)
    common = ["--device", "cpu", "--models", "speedrun_net", "--backends", "compiled", "--batch-size", "8"]
    bench.main(common + ["--data", str(data), "--loaders", "gpu", "--warmup-steps", "1", "--steps", "1",
                         "--wait-steps", "1", "--compile-mode", "reduce-overhead", "--out", str(tmp_path / "b.json")])
    [row] = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "error" not in row, row
    assert row["cudagraphs"] == {"graphs_skipped": 1, "reasons": ["skipping cudagraphs due to cpu device (arg0_1)"]}
    assert "1 graph(s) without CUDA graphs" in capsys.readouterr().out
    text = _bench("report").report([tmp_path / "b.json"])
    assert "torch.compile mode reduce-overhead" in text and f"| {row['step_ms']:.2f} † |" in text
    assert "† torch.compile ran some of this row's graphs without CUDA graphs" in text

    profile = _bench("profile_step")
    _skipping_compile(monkeypatch)
    for mode in (["--compile-mode", "reduce-overhead"], []):
        profile.main(common + ["--warmup", "1", "--steps", "1", "--profile-steps", "1", *mode,
                               "--out", str(tmp_path / "p.json")])
        [row] = json.loads((tmp_path / "p.json").read_text())["rows"]
        text = _bench("report").report([tmp_path / "p.json"])
        if mode:
            assert row["cudagraphs"]["graphs_skipped"] == 1 and "cpu device" in row["cudagraphs"]["reasons"][0]
            assert "without CUDA graphs" in capsys.readouterr().out
            assert "torch.compile mode reduce-overhead" in text and f"| {row['step_ms']:.2f} † |" in text
        else:
            assert "cudagraphs" not in row and "without CUDA graphs" not in capsys.readouterr().out
            assert "torch.compile mode" not in text and "†" not in text and "not compiled" not in text
    torch._dynamo.reset()
    # the overhead stage's uncompiled reference says so in its caption
    profile.main(["--device", "cpu", "--models", "speedrun_net", "--backends", "eager", "--batch-size", "8",
                  "--no-compile", "--warmup", "1", "--steps", "1", "--profile-steps", "1",
                  "--out", str(tmp_path / "e.json")])
    [row] = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert row["compiled"] is False and "cudagraphs" not in row
    assert "; not compiled (eager PyTorch)" in _bench("report").report([tmp_path / "e.json"])


def test_gpu_suite_rejects_unknown_stage(tmp_path):
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "nonsense"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "unknown stage 'nonsense'" in r.stderr
    assert not (tmp_path / "out").exists()


def _bench_loaders():
    return _bench("bench_loaders")


def test_bench_loaders_records_a_failing_loader_and_writes_after_each(tmp_path, monkeypatch):
    bl = _bench_loaders()
    out = tmp_path / "loaders.json"
    real_make, real_time = bl.make_loader, bl.time_epochs
    seen = []

    def make_loader(kind, *args, **kwargs):
        if kind == "ffcv":
            raise RuntimeError("ffcv helper cannot be loaded")
        return real_make(kind, *args, **kwargs)

    def time_epochs(loader, epochs, device):  # what the file holds when the next unit starts
        seen.append(sorted(json.loads(out.read_text())["results"]) if out.exists() else [])
        return real_time(loader, epochs, device)

    monkeypatch.setattr(bl, "make_loader", make_loader)
    monkeypatch.setattr(bl, "time_epochs", time_epochs)
    bl.main(["--device", "cpu", "--synthetic", "256", "--batch-size", "64", "--epochs", "1", "--workers", "1",
             "--baseline-workers", "0", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["ffcv_workers_1"] == {"error": "RuntimeError: ffcv helper cannot be loaded"}
    assert results["gpu_resident"]["images_per_s_median"] > 0
    assert results["torch_dataloader_workers_0"]["images_per_s_median"] > 0
    assert seen == [[], ["ffcv_workers_1", "gpu_resident"]]
    assert [p.name for p in tmp_path.iterdir()] == ["loaders.json"]


def test_bench_loaders_budget_skips_and_still_writes(tmp_path):
    out = tmp_path / "loaders.json"
    _bench_loaders().main(["--device", "cpu", "--synthetic", "256", "--batch-size", "64", "--skip", "gpu", "ffcv",
                           "--budget-s", "-1", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == {
        f"torch_dataloader_workers_{len(os.sched_getaffinity(0))}": {"error": "skipped: --budget-s spent"}}


def test_gpu_suite_preflight_on_cpu(tmp_path):
    """The preflight stage runs here without a GPU: one line per check, the GPU-only ones marked
    skipped, the Triton kernel run in the interpreter, and a missing module named in the last
    line and the exit status (tqdm is made unimportable by a module of that name that raises)."""
    import sys

    import torch

    from train_helpers import make_data

    data = make_data(tmp_path / "data", n_train=64, n_test=32)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "tqdm.py").write_text("raise ImportError('tqdm is broken here')\n")
    out = tmp_path / "out"
    env = {"OUT": str(out), "DATA": str(data), "GPU_DATA": str(tmp_path / "none"), "RESULTS": str(tmp_path / "res"),
           "PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": f"{shadow}{os.pathsep}{REPO}"}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "preflight"], capture_output=True, text=True,
                       env=env, timeout=300)
    lines = r.stdout.splitlines()

    def status(check):
        [line] = [x for x in lines if x.split()[1:2] == [check]]
        return line.split()[0], line

    for module in ("torch", "ffcv", "ffcv.libffcv", "numba", "matplotlib", "typer", "pytest", "scipy"):
        assert status(module)[0] in ("ok", "MISSING"), module  # every later stage's import is checked
    assert status("tqdm") == ("MISSING", status("tqdm")[1]) and "tqdm is broken here" in status("tqdm")[1]
    assert status("cc")[0] == "ok" and status("data")[0] == "ok"
    if not torch.cuda.is_available():
        assert status("cuda")[0] == "SKIPPED" and "no GPU here" in status("cuda")[1]
        assert status("triton")[0] == "ok" and "TRITON_INTERPRET=1" in status("triton")[1]
    [summary] = [x for x in lines if x.startswith("preflight: ")]
    assert summary.startswith("preflight: MISSING") and "tqdm" in summary
    assert r.returncode == 1
    stored = json.loads((out / "preflight.json").read_text())
    assert "tqdm" in stored["missing"] and {c["check"] for c in stored["checks"]} >= {"torch", "triton", "data"}
    assert (out / "suite_preflight.log").read_text().count("MISSING  tqdm") == 1


def test_gpu_suite_carries_compile_caches(tmp_path):
    """A call unpacks the compile cache an earlier call left (COMPILE_CACHE_IN), points
    TorchInductor and Triton at it, says in every results file that it ran warm, and packs the
    cache into $OUT for the next call; with no cache it says "cold". A cache over CACHE_MAX_MB
    is packed again without Triton's intermediate files (.ptx and the like, which loading a
    cached kernel does not need), and not brought back if it is still too big (a call carries at
    most 64 MiB)."""
    import sys
    import tarfile

    from train_helpers import make_data

    data = make_data(tmp_path / "data", n_train=64, n_test=32)
    seed = tmp_path / "seed"
    entry = seed / "triton" / "abc"
    entry.mkdir(parents=True)
    (entry / "kernel.cubin").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    (entry / "kernel.json").write_text('{"name": "kernel"}')
    (entry / "kernel.ptx").write_bytes(os.urandom(3 << 20))      # 3 MiB that no compressor shrinks
    carried = tmp_path / "compile_cache.tar.gz"                     # what a node without xz packs
    with tarfile.open(carried, "w:gz") as tar:
        tar.add(seed, arcname=".")

    def call(name, **extra):
        out = tmp_path / name
        env = {"OUT": str(out), "DATA": str(data), "GPU_DATA": str(tmp_path / "none"),
               "RESULTS": str(tmp_path / "res"), "PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
               "PYTHONPATH": str(REPO), "COMPILE_CACHE_DIR": str(tmp_path / f"cache_{name}"), **extra}
        r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "preflight"], capture_output=True,
                           text=True, env=env, timeout=300)
        return out, r.stdout

    def packed(out):
        [path] = out.glob("compile_cache.tar.*")
        assert path.suffix in (".xz", ".gz")
        with tarfile.open(path) as tar:         # either compression
            return set(tar.getnames())

    out, log = call("warm", COMPILE_CACHE_IN=str(carried))
    assert "compile cache: warm: 3 files" in log
    assert json.loads((out / "preflight.json").read_text())["machine"]["compile_cache"].startswith("warm: 3 files")
    assert {"./triton/abc/kernel.cubin", "./triton/abc/kernel.ptx"} <= packed(out)   # packed again, whole
    assert (tmp_path / "cache_warm" / "triton" / "abc" / "kernel.cubin").is_file()

    out, log = call("cold", COMPILE_CACHE_IN=str(tmp_path / "absent.tar.gz"))
    assert "compile cache: cold" in log
    assert json.loads((out / "preflight.json").read_text())["machine"]["compile_cache"] == "cold"

    out, log = call("pruned", COMPILE_CACHE_IN=str(carried), CACHE_MAX_MB="2")
    assert "packed without Triton's intermediate files" in log
    names = packed(out)
    assert {"./triton/abc/kernel.cubin", "./triton/abc/kernel.json"} <= names and "./triton/abc/kernel.ptx" not in names

    out, log = call("big", COMPILE_CACHE_IN=str(carried), CACHE_MAX_MB="0")
    assert "compile cache not packed" in log and not list(out.glob("compile_cache.tar.*"))
    assert not list(out.glob("*.tmp")) and sorted(p.name for p in out.iterdir()) == ["preflight.json",
                                                                                      "suite_preflight.log"]


def test_report_renders_result_files(tmp_path, capsys):
    """bench/report.py turns real result files (from dry runs here) into Markdown tables naming
    each file and device; dry runs only when asked; the TFLOP/s share uses the matrix-product
    rate of a kernel file from the same device; a run stopped inside a configuration says so."""
    report = _bench("report")
    results = tmp_path / "results"
    _bench_train().main(["--dry-run", "--out", str(results / "bench_train.json")])
    _bench("bench_loaders").main(["--device", "cpu", "--synthetic", "256", "--batch-size", "64", "--skip", "ffcv",
                                  "torch", "--out", str(results / "loaders.json")])
    (results / "unrelated.json").write_text(json.dumps({"kind": "speedrun_result"}))
    (results / "broken.json").write_text("{")

    text = report.report([results], include_dry_run=True)
    stored = json.loads((results / "bench_train.json").read_text())
    row = stored["rows"][0]
    assert "### Training throughput: CPU" in text and "DRY RUN" in text and "bench_train.json" in text
    assert f"| speedrun_net | eager | {row['loader']} | {row['images_per_s']:,.0f} | {row['achieved_tflops']:.1f} |" in text
    assert "### Loaders: CPU" in text and "| gpu_resident |" in text
    assert "speedrun_result" not in text

    # the same figures from a "GPU": no longer a dry run; a kernel file gives the ceiling
    stored["settings"]["dry_run"] = False
    stored["device"] = "NVIDIA H100 80GB HBM3"
    stored["running"] = {"model": "resnet_2111", "bn_backend": "triton", "started_s": 12.5}
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "bench_train.json").write_text(json.dumps(stored))
    shape = {"C": 64, "H": 32, "W": 32, "residual": True, "act": "relu", "count": 4, "fused_ms": 0.1,
             "fused_GBps": 2400.0, "eager_ms": 0.2, "compiled_ms": 0.15, "fused_frac_of_copy_bw": 0.8}
    (gpu / "bn.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "dry_run": False, "dtype": "float16", "memory_format": "channels_last",
        "batch": 512, "versions": {"torch": "2.11.0"}, "complete": True, "copy_GBps": 3000.0, "matmul_TFLOPs": 700.0,
        "shapes": [shape, {**shape, "C": 128, "fused_error": "RuntimeError: boom"}],
        "summary": {"covers": "2 of 2 shapes", "zoo_weighted_ms": {"fused": 1.0, "eager": 2.0, "compiled": 1.5},
                    "speedup_vs_eager": 2.0, "speedup_vs_compiled": 1.5, "fused_frac_of_copy_bw": 0.8},
        "train_step_resnet_2111": {"batch": 512, "triton": {"ms_per_step": 40.0}, "compiled": {"ms_per_step": 44.0},
                                   "speedup_triton_vs_compiled": 1.1}}))
    text = report.report([gpu])
    share = 100 * row["achieved_tflops"] / 700.0
    assert f"{row['achieved_tflops']:.1f} ({share:.0f}%)" in text and "700 TFLOP/s" in text
    assert "**Stopped inside** resnet_2111 / triton" in text
    assert "| 64 | 32×32 | yes | relu | 4 | 0.100 | 0.200 | 0.150 | 2400 | 80% |" in text
    assert "| 128 | 32×32 | yes | relu | 4 | failed |" in text
    assert "Triton ×1.50" in text and "×1.10" in text and "DRY RUN" not in text

    assert report.report([results]).count("###") == 1          # dry runs left out: the loaders only
    assert report.main([str(tmp_path / "absent")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert report.main([str(gpu), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == text


def test_profile_step_dry_run(tmp_path):
    """bench/profile_step.py on the CPU: per configuration, the profiled ops grouped so that the
    categories add up to the total, the top kernels in order, a Chrome trace, and the file
    rewritten after each configuration; kernel names of a GPU step land in the right group."""
    prof = _bench("profile_step")
    out = tmp_path / "p.json"
    result = prof.main(["--dry-run", "--models", "speedrun_net", "--backends", "eager", "compiled",
                        "--model-opt", "act=gelu", "--trace-dir", str(tmp_path / "traces"), "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["kind"] == "profile_step" and stored["dry_run"] and stored["machine"]["versions"]["torch"]
    assert [(r["model"], r["bn_backend"]) for r in stored["rows"]] == [("speedrun_net", "eager"),
                                                                      ("speedrun_net", "compiled")]
    for r in stored["rows"]:
        assert "error" not in r, r
        assert r["model_options"] == {"act": "gelu"}
        cats = r["by_category"]
        assert sum(c["ms_per_step"] for c in cats.values()) == pytest.approx(r["kernel_ms_per_step"])
        assert sum(c["launches_per_step"] for c in cats.values()) == pytest.approx(r["kernels_per_step"])
        assert cats["convolution"]["ms_per_step"] > 0          # the convolutions are found by name
        times = [k["ms_per_step"] for k in r["top_kernels"]]
        assert times == sorted(times, reverse=True) and 0 < len(times) <= 15
        assert r["step_ms"] > 0 and r["images_per_s"] > 0 and r["device_idle_share"] is None
        assert Path(r["trace"]).stat().st_size > 0
    assert stored["rows"] == json.loads(json.dumps(result["rows"]))
    text = _bench("report").report([out], include_dry_run=True)
    conv = stored["rows"][0]["by_category"]["convolution"]
    assert "### Where a training step's time goes: CPU" in text and "| speedrun_net (act=gelu) | compiled |" in text
    assert f"convolution {conv['ms_per_step']:.2f} ms ({conv['launches_per_step']:.0f})" in text

    assert prof.category("fwd_stats_kernel") == "bn_triton" and prof.category("bwd_dx_kernel") == "bn_triton"
    assert prof.category("triton_per_fused__native_batch_norm_legit_functional_0") == "inductor"
    assert prof.category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert prof.category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel") == "optimizer"
    assert prof.category("Memcpy DtoD (Device -> Device)") == "memory"
    assert prof.category("void at::native::vectorized_elementwise_kernel<4>") == "other"
    with pytest.raises(SystemExit, match="unknown model"):
        prof.main(["--dry-run", "--models", "nope", "--out", str(tmp_path / "x.json")])


def test_airbench_on_cpu_without_airbench(tmp_path, capsys):
    """bench/airbench_on_cpu.py refuses in one line, writing nothing, where airbench is missing."""
    try:
        import airbench  # noqa: F401
        pytest.skip("airbench is installed here")
    except ImportError:
        pass
    script = _bench("airbench_on_cpu")
    assert script.main(["--out", str(tmp_path / "a.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "airbench==0.1.8" in err and "\n" not in err
    assert not (tmp_path / "a.json").exists()


def test_gpu_suite_tune_runs_each_grid_setting(tmp_path):
    """The tune stage on the CPU: one speedrun per TUNE_GRID setting, recipe fields and model:
    options routed to --set and --model-opt, EXTRA_SET and NET_OPT added to every setting
    (a value with brackets reaches the model whole, not as a glob), one file per setting."""
    import sys
    import tarfile

    from train_helpers import make_data

    data = make_data(tmp_path / "data", n_train=64, n_test=32)
    (tmp_path / "widths=1").touch()          # what the unquoted pattern widths=[8,16,16,16] would match
    out, res = tmp_path / "out", tmp_path / "res"
    env = {"OUT": str(out), "DATA": str(data), "GPU_DATA": str(tmp_path / "none"), "RESULTS": str(res),
           "PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "COMPILE_CACHE_DIR": str(tmp_path / "cache"), "TUNE_RUNS": "1",
           "TUNE_GRID": "epochs=1 epochs=1,weight_decay=0.001,model:stem=conv",
           "EXTRA_SET": "batch_size=32", "NET_OPT": "widths=[8,16,16,16] logit_scale=1.0"}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "tune"], capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    # preflight fails here for want of airbench and CUDA; the tune steps themselves must not
    failed = [line for line in r.stdout.splitlines() if "FAILED" in line]
    assert all("preflight.py" in line for line in failed), r.stdout[-3000:]
    files = sorted(p.name for p in (res / "tune").glob("*.json"))
    assert files == ["speedrun_net_epochs_1.json", "speedrun_net_epochs_1_weight_decay_0.001_model_stem_conv.json"]
    plain, varied = (json.loads((res / "tune" / f).read_text()) for f in files)
    for result in (plain, varied):
        assert result["recipe_fields"]["epochs"] == 1 and result["recipe_fields"]["batch_size"] == 32
        assert result["model_options"]["widths"] == [8, 16, 16, 16] and result["baseline"] is None
        assert len(result["runs"]) == 1 and "error" not in result["runs"][0]
    assert "stem" not in plain["model_options"] and plain["recipe_fields"]["weight_decay"] == 5e-4
    assert varied["model_options"]["stem"] == "conv" and varied["recipe_fields"]["weight_decay"] == 0.001
    with tarfile.open(out / "tune_speedrun_net.tar.gz") as tar:
        assert sorted(tar.getnames()) == files


def test_gpu_suite_tune_names_settings_and_expands_airbench_like(tmp_path):
    """A setting's name:LABEL names its file; the word airbench_like stands for airbench94's
    network and recipe (model options and recipe fields routed as any other setting's)."""
    r, calls, out = _suite_with_stub_python(tmp_path, "tune", TUNE_GRID="airbench_like name:short,epochs=3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(calls) == 2, calls
    like, short = calls
    for flag in ("--set epochs=10", "--set lr=1.5", "--set momentum=0.85", "--set lookahead_ramp=true", "--set ema=0",
                 "--model-opt act=gelu", "--model-opt residual=false", "--model-opt dirac_init=true",
                 "--model-opt stem_norm=false", "--model-opt bn_momentum=0.4", "--model-opt bn_eps=1e-12"):
        assert flag in like, flag
    assert "name:" not in like and "name:" not in short and "--set epochs=3" in short
    assert like.endswith("tune/speedrun_net_airbench_like.json") and short.endswith("tune/speedrun_net_short.json")


def test_gpu_suite_race_runs_airbench_like_against_airbench94(tmp_path):
    """The race stage: speedrun_net as airbench94 (airbench_like) with the baseline, in the
    compile mode asked for, its file named after the setting and the mode; then the setting
    with each change of RACE_SWEEP without the baseline (the change's values after the
    setting's, so they win), packed into one file; or another setting."""
    import tarfile

    r, calls, out = _suite_with_stub_python(tmp_path, "race", COMPILE_MODE="reduce-overhead", SPEEDRUN_RUNS="5",
                                            RACE_SWEEP="epochs=8,optimizer=muon epochs=9")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    race, muon, nine = calls
    assert race.startswith("-m fastcifar.cli speedrun --model speedrun_net --baseline --runs 5 --set epochs=10")
    assert "--model-opt residual=false" in race and "--compile-mode reduce-overhead" in race
    assert "--set tta_shift=1" in race                         # airbench94's 1-pixel test views
    assert race.endswith(f"--out {out}/speedrun_airbench_like_reduce-overhead.json")
    for sweep, change in ((muon, "--set epochs=8 --set optimizer=muon"), (nine, "--set epochs=9")):
        assert sweep.startswith("-m fastcifar.cli speedrun --model speedrun_net --no-baseline --runs 3")
        assert "--set epochs=10" in sweep and sweep.index(change) > sweep.index("--set epochs=10")
        assert "--model-opt bn_eps=1e-12" in sweep and "--compile-mode reduce-overhead" in sweep
    assert muon.endswith("race/speedrun_airbench_like_epochs_8_optimizer_muon_reduce-overhead.json")
    assert nine.endswith("race/speedrun_airbench_like_epochs_9_reduce-overhead.json")
    with tarfile.open(out / "race_sweep_reduce-overhead.tar.gz") as tar:
        assert {"speedrun_airbench_like_epochs_8_optimizer_muon_reduce-overhead.json",
                "speedrun_airbench_like_epochs_9_reduce-overhead.json"} <= set(tar.getnames())
    # COMPILE_MODE=none: no torch.compile at all
    (tmp_path / "eager").mkdir()
    r, calls, out = _suite_with_stub_python(tmp_path / "eager", "race", COMPILE_MODE="none", RACE_SWEEP="")
    assert r.returncode == 0 and len(calls) == 1 and " --no-compile " in calls[0] and "--compile-mode" not in calls[0]
    assert calls[0].endswith(f"--out {out}/speedrun_airbench_like_none.json")
    # too little of the call left: the sweep (by default Muon at 8 epochs first) is not started,
    # and that is no failure
    (tmp_path / "late").mkdir()
    r, calls, out = _suite_with_stub_python(tmp_path / "late", "race", RACE_SWEEP_MIN_S="100000")
    assert r.returncode == 0 and len(calls) == 1 and "race: epochs=8,optimizer=muon not started" in r.stdout
    (tmp_path / "other").mkdir()
    r, calls, out = _suite_with_stub_python(tmp_path / "other", "race", "name:gelu8,epochs=8,model:act=gelu",
                                            RACE_SWEEP="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    [race] = calls
    assert "--set epochs=8 --model-opt act=gelu" in race and "--compile-mode" not in race
    assert race.endswith(f"--out {out}/speedrun_gelu8.json")


def _collect(*args) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_shard_option_partitions_the_tests():
    """--shard I/N (tests/conftest.py) splits the tests into N disjoint parts that together are
    all of them, the `one_shard` production-shape cases all in shard 0; a bad I/N is a usage error."""
    files = ["tests/test_kernels_gpu.py", "tests/test_results.py"]

    def ids(*extra):
        r = _collect(*extra, *files)
        assert r.returncode == 0, r.stdout + r.stderr
        return [line for line in r.stdout.splitlines() if "::" in line]

    everything = ids()
    shards = [ids("--shard", f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(everything) and len(set(sum(shards, []))) == len(everything)
    production = [t for t in everything if t.startswith("tests/test_kernels_gpu.py")]
    assert len(production) >= 20 and set(production) <= set(shards[0])
    assert all(shards[1:]) and all(not t.startswith("tests/test_kernels_gpu.py") for t in shards[1] + shards[2])
    for bad in ("3/3", "x/2", "1"):
        r = _collect("--shard", bad, *files)
        assert r.returncode == 4 and "--shard" in r.stderr, (bad, r.stderr)


def test_gpu_suite_tests_stage_runs_shards_at_once(tmp_path):
    """The `tests` stage runs the GPU tests as TEST_SHARDS pytest processes at once, prefixes each
    log line with its shard, merges their junit reports into pytest_gpu.xml, and fails the stage
    when one shard has a failing test."""
    import sys
    import xml.etree.ElementTree as ET

    import torch

    from train_helpers import make_data

    data = make_data(tmp_path / "data", n_train=64, n_test=32)
    failing = tmp_path / "test_failing.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    env = {"OUT": str(out), "DATA": str(data), "GPU_DATA": str(tmp_path / "none"), "RESULTS": str(tmp_path / "res"),
           "PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "TEST_SHARDS": "3",
           "COMPILE_CACHE_DIR": str(tmp_path / "cache"),
           "GPU_TESTS": f"tests/test_kernels_gpu.py tests/test_results.py {failing}"}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "tests"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=REPO)
    log = r.stdout
    assert r.returncode != 0
    for i in range(3):
        assert f"[shard {i}] " in log
    assert "PASSED" in log and "test_fails FAILED" in log and log.count("GPU tests: shard ") == 1
    suites = ET.parse(out / "pytest_gpu.xml").getroot()
    assert suites.tag == "testsuites" and len(suites) == 3
    total = _collect("tests/test_kernels_gpu.py", "tests/test_results.py", str(failing)).stdout.count("::")
    assert sum(int(s.get("tests")) for s in suites) == total
    assert sum(int(s.get("failures")) for s in suites) == 1
    if not torch.cuda.is_available():       # the production-shape cases, skipped here, are counted too
        assert sum(int(s.get("skipped")) for s in suites) >= 20


def _suite_with_stub_python(tmp_path, stage, *args, **env_extra):
    """`bash bench/gpu_suite.sh STAGE ARGS` with a stub Python that records each command line
    (writing "{}" to any --out and a trace to any --trace-dir) and empty .beton files as data.
    Returns (completed process, the recorded calls but preflight's, the $OUT folder)."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "$*" >> "$CALLS"\nwhile [ $# -gt 0 ]; do\n'
                    '  [ "$1" = --out ] && echo "{}" > "$2"\n'
                    '  [ "$1" = --trace-dir ] && mkdir -p "$2" && echo x | gzip > "$2/trace_m_b.json.gz"\n'
                    '  shift\ndone\n')
    fake.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.beton", "test.beton"):
        (data / name).touch()
    out = tmp_path / "out"
    env = {"OUT": str(out), "DATA": str(data), "GPU_DATA": str(tmp_path / "none"), "RESULTS": str(tmp_path / "res"),
           "PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(log),
           "COMPILE_CACHE_DIR": str(tmp_path / "cache"), **env_extra}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), stage, *args], capture_output=True, text=True,
                       env=env, timeout=120, cwd=tmp_path)
    calls = [c for c in log.read_text().splitlines() if "preflight.py" not in c] if log.exists() else []
    return r, calls, out


def test_gpu_suite_overhead_stage_profiles_both_modes(tmp_path):
    """The overhead stage: profile_step uncompiled (cuDNN's BatchNorm), in torch.compile's
    default mode, then in reduce-overhead (each its own result and trace files), then
    speedrun_net against the baseline with --compile-mode reduce-overhead. Python is a stub that
    records its arguments."""
    r, calls, out = _suite_with_stub_python(tmp_path, "overhead")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(calls) == 4, calls
    eager, default, graphs, speedrun = calls
    assert "bench/profile_step.py --models resnet_2111 speedrun_net --backends eager --no-compile" in eager
    assert eager.endswith(f"--out {out}/profile_step_eager.json")
    assert "bench/profile_step.py" in default and "--compile-mode" not in default
    assert default.endswith(f"--out {out}/profile_step.json")
    assert "bench/profile_step.py" in graphs and "--compile-mode reduce-overhead" in graphs
    assert graphs.endswith(f"--out {out}/profile_step_reduce-overhead.json")
    assert speedrun.startswith("-m fastcifar.cli speedrun --model speedrun_net --baseline")
    assert "--compile-mode reduce-overhead" in speedrun
    assert speedrun.endswith(f"--out {out}/speedrun_speedrun_net_reduce-overhead.json")
    made = sorted(p.name for p in out.iterdir())
    assert {"profile_step_eager.json", "profile_step.json", "profile_step_reduce-overhead.json", "profile_traces.tar.gz",
            "profile_traces_reduce-overhead.tar.gz", "speedrun_speedrun_net_reduce-overhead.json"} <= set(made)


def test_gpu_suite_call1_runs_tests_kernel_table_and_loaders(tmp_path):
    """Call 1: the GPU tests in TEST_SHARDS processes, bench_bn_relu's per-shape table for the
    headline models without its train steps (the overhead stage times those), then the loaders.
    Python is a stub that records its arguments."""
    r, calls, out = _suite_with_stub_python(tmp_path, "call1", TEST_SHARDS="2")
    tests = [c for c in calls if c.startswith("-m pytest")]
    rest = [c for c in calls if c.startswith("bench/")]     # the merge of the shards' junit files apart
    assert sorted(c.split("--shard ")[1].split()[0] for c in tests) == ["0/2", "1/2"], calls
    assert len(rest) == 2, rest
    kernels, loaders = rest
    assert kernels.startswith("bench/bench_bn_relu.py") and "--models speedrun_net,resnet_2111" in kernels
    assert "--skip-train-step" in kernels and kernels.endswith(f"--out {out}/bench_bn_relu.json")
    assert loaders.startswith("bench/bench_loaders.py --device cuda") and loaders.endswith(f"--out {out}/bench_loaders.json")


def test_gpu_suite_zoo_stage_runs_each_model_to_its_target(tmp_path):
    """The zoo stage: per MODEL[:FIELD=VALUE,...] one `fastcifar speedrun --no-baseline --target
    report --calibration FILE` with the overrides as --set, $ZOO_TARGET_RUNS runs, one result
    file per spec, all packed into zoo_results.tar.gz; a spec without epochs trains the epochs
    that fit $ZOO_BUDGET_S of training. Python is a stub that records its arguments."""
    import tarfile

    r, calls, out = _suite_with_stub_python(tmp_path, "zoo", "resnet_2111:epochs=40,lr=0.1", "resnet_6543",
                                            ZOO_TARGET_RUNS="4", CALIBRATION="cal.json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(calls) == 2, calls
    tuned, plain = calls
    for call, model in ((tuned, "resnet_2111"), (plain, "resnet_6543")):
        assert call.startswith(f"-m fastcifar.cli speedrun --model {model} --no-baseline --runs 4 "
                               "--target report --calibration cal.json --warmup-epochs 1"), call
    assert "--set epochs=40 --set lr=0.1" in tuned and "--set" not in plain
    assert "--train-budget-s" not in tuned and "--train-budget-s 80 " in plain
    assert tuned.endswith(f"--out {tmp_path}/res/zoo_resnet_2111_epochs_40_lr_0.1_gpu.json")
    assert plain.endswith(f"--out {tmp_path}/res/zoo_resnet_6543_gpu.json")
    with tarfile.open(out / "zoo_results.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["zoo_resnet_2111_epochs_40_lr_0.1_gpu.json", "zoo_resnet_6543_gpu.json"]
