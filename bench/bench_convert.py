"""Time `fastcifar convert` on the 60,000-image JPEG copy of CIFAR-10 (goal: <= 60 s on 2 cores).

    python3 bench/bench_convert.py [--source path/to/cifar10-jpeg-q75.tar.gz] [--repeats 1]

Each run converts from scratch (--force) into a temporary folder; the report holds every run's
wall time, the median, and the machine. Writes bench/results/convert_cpu.json. Exits 0 with a
message when the source archive is absent.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


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

    from beton_data.convert import convert
    from fastcifar.machine import machine_info

    times, manifest = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):   # progress bars
                manifest = convert(str(args.source), Path(tmp) / "out", force=True)
            times.append(time.perf_counter() - t)
            print(f"convert: {times[-1]:.1f} s", flush=True)

    report = {
        "benchmark": "fastcifar convert, image-folder .tar.gz of JPEGs -> train.beton + test.beton",
        "source": args.source.name, "source_sha256": manifest["source_sha256"],
        "images": {s: v["count"] for s, v in manifest["splits"].items()},
        "wall_s": [round(t, 2) for t in times], "wall_s_median": round(statistics.median(times), 2),
        "goal_s": 60,
        "machine": machine_info(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"median {report['wall_s_median']} s (goal <= 60 s); wrote {args.out}")


if __name__ == "__main__":
    main()
