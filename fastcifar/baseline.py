"""The speedrun baseline: airbench's ``train94`` (PyPI ``airbench==0.1.8``, 94.01% mean accuracy
published over 1,000 runs on the original CIFAR-10), run on OUR data, device and process.

How airbench 0.1.8 finds its data: ``CifarLoader(path, train)`` loads ``<path>/train.pt`` or
``<path>/test.pt`` (a ``torch.save`` dict: ``images`` uint8 [N,32,32,3], ``labels`` int64 [N],
``classes``) and only downloads through torchvision when that file is missing. ``train94`` builds
its test loader from the relative path ``cifar10``, so the adapter writes both files under
``<workdir>/cifar10/`` from our .beton files and calls airbench with ``<workdir>`` as the working
directory: no network, and exactly the images our own runs train and test on.

airbench is used as published, never copied: its network, hyperparameters (``hyp``), loader
and test-time augmentation are its own. Only the seed is ours (airbench sets none).

Timing matches ours: CUDA-synchronised wall time of training plus the final (TTA) evaluation,
after the data is on the device and after one untimed warm-up run. Loading the training set
happens before the clock starts; airbench builds its test loader inside ``train94`` (one 30 MB
``torch.load``), which stays in its time.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from beton_data.files import atomic_path
from beton_data.sources import CLASSES
from fastcifar.errors import UserError
from fastcifar.machine import package_version, sync

NAME = "airbench94"
VERSION = "0.1.8"
PUBLISHED_ACC = 0.9401          # mean over 1,000 runs on the original CIFAR-10 (airbench README)


def write_airbench_split(folder: str | Path, train: bool, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``folder/train.pt`` or ``folder/test.pt`` in the layout airbench's CifarLoader loads;
    returns its path. Atomic (temporary file in ``folder``, then os.replace)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"images must be uint8 [N,32,32,3], got {images.dtype} {list(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape [{len(images)}], got {list(labels.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("train.pt" if train else "test.pt")
    with atomic_path(path) as tmp:
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(images)),
                    "labels": torch.from_numpy(labels.astype(np.int64)),
                    "classes": list(CLASSES)}, tmp)
    return path


def prepare_workdir(workdir: str | Path, data_dir: str | Path, original_npz: Optional[Path] = None) -> Path:
    """Fill ``workdir`` with what train94 reads: ``cifar10/{train,test}.pt`` from
    ``data_dir/{train,test}.beton``, and ``original/test.pt`` from ``original_npz`` if given."""
    from beton_data import read_beton

    workdir, data_dir = Path(workdir), Path(data_dir)
    for train, name in ((True, "train.beton"), (False, "test.beton")):
        images, labels = read_beton(data_dir / name)
        write_airbench_split(workdir / "cifar10", train, images, labels)
    if original_npz is not None:
        images, labels = load_npz(original_npz)
        write_airbench_split(workdir / "original", False, images, labels)
    return workdir


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``images`` uint8 [N,32,32,3] and ``labels`` [N] from an .npz (e.g. the 1,017 original
    CIFAR-10 test images)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .npz file")
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"].astype(np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: expected an .npz with arrays 'images' and 'labels' ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) \
            or labels.shape != (len(images),):
        raise UserError(f"{path}: 'images' must be uint8 [N,32,32,3] and 'labels' [N], got "
                        f"{images.dtype} {list(images.shape)} and {list(labels.shape)}")
    return images, labels


def import_airbench():
    """The airbench module, checked to be the pinned version; UserError if it cannot be used."""
    try:
        import airbench
    except ImportError as e:
        raise UserError(f"the baseline needs airbench=={VERSION} and torchvision ({e}); "
                        f"`pip install airbench=={VERSION} torchvision`, or pass --no-baseline") from None
    version = package_version("airbench")
    if version not in (None, VERSION):
        raise UserError(f"the baseline is pinned to airbench=={VERSION}, found {version}; "
                        f"`pip install airbench=={VERSION}`")
    return airbench


def require_cuda(device: str) -> None:
    """airbench builds its network with ``.cuda()`` and times with CUDA events: GPU only."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise UserError(f"the {NAME} baseline needs a CUDA GPU (device {device!r}, CUDA available: "
                        f"{torch.cuda.is_available()}); without one use `fastcifar speedrun --no-baseline`")


class AirbenchBaseline:
    """train94 on our data: ``warmup()`` once, then ``run(seed)`` per timed run.

    Use as a context manager; it owns a temporary working directory holding the data files."""

    def __init__(self, data_dir: str | Path, device: str = "cuda", original_npz: Optional[Path] = None):
        require_cuda(device)
        self.airbench = import_airbench()
        self.device = device
        self._tmp = tempfile.TemporaryDirectory(prefix="airbench-")
        self.workdir = prepare_workdir(self._tmp.name, data_dir, original_npz)
        self.has_original = original_npz is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()

    @contextlib.contextmanager
    def _in_workdir(self):
        # train94 opens its test set as the relative path 'cifar10'
        old = os.getcwd()
        os.chdir(self.workdir)
        try:
            yield
        finally:
            os.chdir(old)

    def warmup(self) -> None:
        """One untimed training run (cuDNN autotuning, allocator, lazy CUDA init)."""
        self.run(seed=-1)

    def run(self, seed: int) -> dict:
        """One timed train94 run; accuracy (fraction) with airbench's own TTA level, time in s."""
        ab = self.airbench
        hyp = ab.lib_airbench94.hyp
        torch.manual_seed(seed & 0xFFFFFFFF)
        with self._in_workdir():
            # the training loader train94 would build itself, built before the clock starts
            loader = ab.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"],
                                    aug=hyp["aug"], altflip=True)
            test = ab.CifarLoader("cifar10", train=False, batch_size=2000)
            tta = hyp["net"]["tta_level"]
            sync(self.device)
            start = time.perf_counter()
            model = ab.train94(loader, verbose=False)
            acc = ab.evaluate(model, test, tta_level=tta)
            sync(self.device)
            elapsed = time.perf_counter() - start
            out = {"seed": seed, "accuracy": float(acc), "time_s": elapsed}
            if self.has_original:
                original = ab.CifarLoader("original", train=False, batch_size=2000)
                out["original_accuracy"] = float(ab.evaluate(model, original, tta_level=tta))
        return out


def run_baseline(data_dir: Path, device: str, seeds: list[int], original_npz: Optional[Path] = None,
                 on_run: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """One warm-up, then one timed train94 run per seed. A timed run that fails is recorded as
    ``{"seed", "error"}`` and the next one runs; ``on_run`` sees every run as it ends (to write
    results as they come). A failing set-up or warm-up raises: nothing could be timed."""
    with AirbenchBaseline(data_dir, device, original_npz) as baseline:
        baseline.warmup()
        results = []
        for seed in seeds:
            try:
                results.append(baseline.run(seed))
            except Exception as e:  # noqa: BLE001  (this seed is lost, not the others)
                results.append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
            on_run(results[-1])
        return results


def default_calibration_path(device: str) -> Path:
    from fastcifar.machine import device_name
    from fastcifar.results import device_slug

    return Path("bench/results") / f"calibrate_{NAME}_{device_slug(device_name(device))}.json"


def calibrate(data_dir: Path, runs: int = 5, original_npz: Optional[Path] = None,
              out: Optional[Path] = None, device: str = "cuda", seed: int = 0) -> dict:
    """train94 alone, ``runs`` times on ``data_dir``: how far this data (e.g. the JPEG copy) and
    machine put it from its published 94.01%. ``gap_to_published`` = published - measured mean
    (fractions); on the JPEG copy that is the copy's accuracy penalty for this network.

    The result file (``out``, default bench/results/calibrate_airbench94_<device>.json) is
    rewritten after every run, so a time limit keeps the runs finished before it, and a
    baseline leaderboard entry beside it lets the leaderboard compare other results on the same
    data and device with these runs."""
    import uuid

    from beton_data.files import check_writable
    from beton_data import check_data
    from fastcifar.leaderboard import add_entry
    from fastcifar.machine import command_line, device_name, machine_info, resolve_device, versions
    from fastcifar.results import aggregate, format_ci, format_pm, now_iso, write_result

    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    data_files = check_data(data_dir)
    data_dir = data_files.folder
    if original_npz is not None:
        load_npz(original_npz)  # fail now on a bad file, not after the runs
    device = resolve_device(device)
    require_cuda(device)
    import_airbench()
    out = Path(out) if out is not None else default_calibration_path(device)
    check_writable(out.parent, "calibrate --out")
    result = {"kind": "airbench_calibration", "id": uuid.uuid4().hex, "name": NAME,
              "package": f"airbench=={VERSION}", "device": device_name(device), "data": data_files.name,
              "data_sha256": data_files.identity, "data_dir": str(data_dir), "command": command_line(),
              "date": now_iso(), "versions": versions(), "machine": machine_info(device),
              "published_acc": PUBLISHED_ACC, "seeds": list(range(seed, seed + runs)), "runs": []}

    def save(r: dict) -> None:
        result["runs"].append(r)
        if "error" in r:
            print(f"  {NAME} seed {r['seed']}: FAILED: {r['error']}")
        else:
            print(f"  {NAME} seed {r['seed']}: {100 * r['accuracy']:.2f}% in {r['time_s']:.2f} s")
        result.update(aggregate(result["runs"]))
        ok = [x for x in result["runs"] if "error" not in x]
        if ok:
            result["gap_to_published"] = PUBLISHED_ACC - result["accuracy_mean"]
            add_entry(out.parent, {"kind": "baseline", "id": result["id"], "model": NAME,
                                   "recipe": result["package"], "device": result["device"],
                                   "data": result["data"], "data_sha256": result["data_sha256"],
                                   "accuracies": [x["accuracy"] for x in ok], "times_s": [x["time_s"] for x in ok],
                                   "failed_runs": len(result["runs"]) - len(ok), "date": result["date"],
                                   "versions": result["versions"], "command": result["command"]})
        write_result(out, result)

    print(f"calibrate: {NAME} alone, 1 warm-up + {runs} timed runs on {result['data']} ({result['device']}); "
          f"results after every run in {out}")
    run_baseline(data_dir, device, result["seeds"], original_npz, on_run=save)
    ok = result.get("runs_ok", 0)
    if ok:
        print(f"{NAME} on {result['data']}: {format_pm(result['accuracy_mean'], result['accuracy_std'], 100)}% "
              f"(95% CI {format_ci(result['accuracy_ci95'], 100)}) over {ok} runs (published "
              f"{100 * PUBLISHED_ACC:.2f}% on the original CIFAR-10): gap {100 * result['gap_to_published']:+.2f} "
              f"points; time {format_pm(result['time_mean_s'], result['time_std_s'])} s")
    print(f"wrote {out}")
    if ok < runs:
        raise UserError(f"{runs - ok} of {runs} calibration runs failed; the others are in {out}")
    return result
