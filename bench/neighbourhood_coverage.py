"""How many MzsRE edits get neighbourhood prompts, per language (no model needed).

    python bench/neighbourhood_coverage.py ../shared/data/mzsre [--limit 100] [--per-edit 5] [--seed 0]

For each of the 12 MzsRE languages, over the records read (all 743, or the
first ``--limit``, the pool a run of that many records draws from):

* ``subject in prompt``: records whose subject string occurs in their prompt
  (where it does not, the subject cannot be replaced in that language);
* ``shares template``: records whose prompt, subject replaced by a
  placeholder, equals another record's (the question asked about another
  subject by the benchmark itself);
* ``with neighbours``: records with at least one neighbourhood prompt under
  the measure's rule (mke_lightning/evaluation/neighbourhood.py), the mean number of
  prompts per record, and how many came from each source (``template``,
  ``subject``, ``edit_template``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from mke_lightning.data import read_mzsre
from mke_lightning.evaluation.neighbourhood import SOURCES, NeighbourhoodConfig, NeighbourPool, template_of

MZSRE_LANGUAGES = ["en", "cs", "de", "es", "fr", "nl", "pt", "ru", "th", "tr", "vi", "zh"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the MzsRE folder (pair files)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (the pool of a run of N)")
    parser.add_argument("--per-edit", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    records = read_mzsre(args.path, MZSRE_LANGUAGES)[: args.limit]
    start = time.perf_counter()
    pool = NeighbourPool(records, MZSRE_LANGUAGES, "en", NeighbourhoodConfig(args.per_edit, args.seed))
    prompts = [pool.prompts(r) for r in records]
    seconds = time.perf_counter() - start
    n = len(records)
    print(f"{n} records, edit language en, {args.per_edit} neighbours per edit, seed {args.seed} "
          f"(index and prompts of every record: {seconds:.2f} s)\n")
    head = ["lang", "subject in prompt", "shares template", "with neighbours", "prompts/record",
            *(f"from {s}" for s in SOURCES)]
    lines = []
    for lang in MZSRE_LANGUAGES:
        templates = [template_of(r.facts(lang).subject, r.facts(lang).prompt) for r in records]
        count = Counter(t for t in templates if t is not None)
        shared = sum(1 for t in templates if t is not None and count[t] > 1)
        placed = sum(t is not None for t in templates)
        got = [p.get(lang, []) for p in prompts]
        sources = Counter(src for g in got for _, _, src in g)
        lines.append([lang, f"{placed}/{n}", f"{shared}/{n}", f"{sum(bool(g) for g in got)}/{n}",
                      f"{sum(map(len, got)) / n:.2f}", *(str(sources[s]) for s in SOURCES)])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.rjust(w) for c, w in zip(r, widths))

    print("\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)]))


if __name__ == "__main__":
    main()
