"""`make bench`: run every benchmark module in turn (each writes benchmarks/results/<name>.json)."""

from __future__ import annotations

import importlib
import inspect
import sys

BENCHMARKS = ["benchmarks.bench_data", "benchmarks.bench_models", "benchmarks.bench_trainer",
              "benchmarks.bench_checkpoint", "benchmarks.bench_step", "benchmarks.bench_adaptive"]
# needs a GPU (or --tiny): not part of `make bench`'s sweep, run by name (`python -m benchmarks.run gpu`) or
# `make bench-gpu`
ON_REQUEST = ["benchmarks.gpu"]


def main(argv: list[str]) -> int:
    chosen = [b for b in BENCHMARKS if not argv or any(a in b for a in argv)]
    chosen += [b for b in ON_REQUEST if argv and any(a in b for a in argv)]
    failed = []
    for name in chosen:
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(name)
            # a benchmark that parses flags must not see run.py's own arguments (the selection)
            module.main([]) if "argv" in inspect.signature(module.main).parameters else module.main()
        except Exception as err:  # one broken benchmark must not hide the others' numbers
            print(f"{name} failed: {err!r}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
