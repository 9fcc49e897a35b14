"""Peak memory of reading a native JSONL file as it grows (10x, 100x).

Writes a synthetic file of ``--base`` records times each factor, then reads
each one in a fresh subprocess (``open_source``: the checking pass, then one
pass over every record, as a run's dataloader would) and prints the peak RSS
the subprocess reports from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. A baseline subprocess that
only imports the package shows what the imports alone cost.

    python bench/streaming_read.py --base 2000 --factors 10 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ = """
import resource, sys
from mke_lightning.data import open_source
source = open_source(sys.argv[1], "jsonl")
n = sum(len(r.languages) for r in source)
print(len(source), n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

IMPORT_ONLY = """
import resource
import mke_lightning.data
print(0, 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def record(i: int) -> dict:
    """One synthetic record in six languages, about 1.5 kB as JSON."""
    langs = ("en", "de", "fr", "es", "ru", "zh")
    block = lambda lang: {  # noqa: E731
        "subject": f"Subject {i} ({lang})",
        "prompt": f"[{lang}] The headquarters of company number {i} are located in the city of",
        "target_new": f"City {i % 997}",
        "target_true": f"Town {i % 991}",
        "paraphrases": [f"[{lang}] Company {i} has its headquarters in"],
        "locality": [{"prompt": f"[{lang}] The river through city {i % 89} is", "answer": f"River {i % 89}"}],
        "portability": [
            {"prompt": f"[{lang}] The country of company {i}'s headquarters is", "answer": f"Country {i % 53}"}
        ],
    }
    return {"id": f"syn-{i}", "languages": {lang: block(lang) for lang in langs}}


def write(path: Path, count: int) -> int:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(count):
            fh.write(json.dumps(record(i), ensure_ascii=False) + "\n")
    return path.stat().st_size


def peak_rss_mib(code: str, *args: str) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, records read) of ``python -c code args`` in a new process.

    The child reports its own ``ru_maxrss`` (KiB on Linux) after reading.
    """
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    count, _, maxrss_kib = (int(x) for x in out.split())
    return maxrss_kib / 1024, seconds, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=2000, help="records in the 1x file")
    parser.add_argument(
        "--factors", type=int, nargs="+", default=[10, 100], help="file sizes to read, as multiples of --base"
    )
    args = parser.parse_args(argv)
    factors = sorted(args.factors)
    with tempfile.TemporaryDirectory() as folder:
        rss, secs, _ = peak_rss_mib(IMPORT_ONLY)
        print(f"{'file':>8} {'records':>9} {'MiB on disk':>12} {'peak RSS MiB':>13} {'read s':>7}")
        print(f"{'imports':>8} {0:>9} {0:>12.1f} {rss:>13.1f} {secs:>7.1f}")
        for factor in factors:
            path = Path(folder) / f"x{factor}.jsonl"
            count = args.base * factor
            size = write(path, count)
            rss, secs, read = peak_rss_mib(READ, str(path))
            assert read == count, (read, count)
            print(f"{f'{factor}x':>8} {count:>9} {size / 2**20:>12.1f} {rss:>13.1f} {secs:>7.1f}")
            path.unlink()


if __name__ == "__main__":
    main()
