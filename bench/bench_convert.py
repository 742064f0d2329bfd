"""Time `fastcifar convert` on the 60,000-image JPEG copy of CIFAR-10 (goal: <= 60 s on 2 cores),
and the .beton writer alone against FFCV's DatasetWriter.

    python3 bench/bench_convert.py [--source path/to/cifar10-jpeg-q75.tar.gz] [--repeats 1]

Each run converts from scratch (--force) into a temporary folder; the report holds every run's
wall time, the median, and the machine. Then the converted train split (50,000 images) is
written `--repeats` times by `write_beton` (one process) and by FFCV's DatasetWriter with 1
and 2 worker processes, the writer convert used before (same page size, same two fields).
Writes bench/results/convert_cpu.json. Exits 0 with a message when the source archive is absent.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def time_writers(images, labels, repeats: int, folder: Path) -> dict:
    """Median wall seconds to write (images, labels) as a .beton, per writer."""
    import beton_data._ffcv  # noqa: F401  (keeps torch's thread count)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    from beton_data import write_beton

    class Samples:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    def ffcv_writer(workers):
        def write(path):
            w = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                              page_size=MIN_PAGE_SIZE, num_workers=workers)
            with contextlib.redirect_stderr(io.StringIO()):   # its progress bar
                w.from_indexed_dataset(Samples(), chunksize=1000)
        return write

    writers = {"write_beton (1 process)": lambda path: write_beton(path, images, labels),
               "ffcv DatasetWriter, 1 worker process": ffcv_writer(1),
               "ffcv DatasetWriter, 2 worker processes": ffcv_writer(2)}
    out = {}
    for name, write in writers.items():
        times = []
        for _ in range(repeats):
            path = folder / "w.beton"
            t = time.perf_counter()
            write(path)
            times.append(time.perf_counter() - t)
            path.unlink()
        out[name] = {"wall_s": [round(t, 3) for t in times], "wall_s_median": round(statistics.median(times), 3)}
        print(f"{name}: {out[name]['wall_s_median']:.2f} s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(os.environ.get("CIFAR_JPEG_TAR", "cifar10-jpeg-q75.tar.gz")),
                    help="the JPEG image-folder copy of CIFAR-10 (default: $CIFAR_JPEG_TAR or ./cifar10-jpeg-q75.tar.gz)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "convert_cpu.json")
    args = ap.parse_args()
    if not args.source.is_file():
        print(f"skipped: {args.source} not found (pass --source a CIFAR-10 image-folder .tar.gz)")
        return

    from beton_data import read_beton
    from beton_data.convert import convert
    from beton_data.files import atomic_write_json
    from fastcifar.machine import machine_info

    times, manifest = [], None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTCIFAR_CACHE"] = str(Path(tmp) / "cache")    # leave the user's cache alone
        for _ in range(args.repeats):
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):   # progress bars
                manifest = convert(str(args.source), Path(tmp) / "out", force=True, say=lambda *a: None)
            times.append(time.perf_counter() - t)
            print(f"convert: {times[-1]:.1f} s", flush=True)
        images, labels = read_beton(Path(tmp) / "out" / "train.beton")
        writers = time_writers(images, labels, args.repeats, Path(tmp))

    report = {
        "benchmark": "fastcifar convert, image-folder .tar.gz of JPEGs -> train.beton + test.beton",
        "source": args.source.name, "source_sha256": manifest.source_sha256,
        "images": {s: v["count"] for s, v in manifest.splits.items()},
        "data_identity": manifest.identity,
        "wall_s": [round(t, 2) for t in times], "wall_s_median": round(statistics.median(times), 2),
        "goal_s": 60,
        "beton_write_train_split": writers,
        "machine": machine_info(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(args.out, report)
    print(f"median {report['wall_s_median']} s (goal <= 60 s); wrote {args.out}")


if __name__ == "__main__":
    main()
