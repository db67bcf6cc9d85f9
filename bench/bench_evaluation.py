"""Evaluation throughput: samples/s per capability on CPU (reference editor), to size evaluation
against edit time. Prints numbers; asserts nothing.

    python bench/bench_evaluation.py [--per-capability 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-capability", type=int, default=32)
    args = parser.parse_args()

    from bridgecore.evaluation.benchmark_data import make_benchmark
    from bridgecore.evaluation.capabilities import CapabilityEvaluator, reference_editor

    root = tempfile.mkdtemp(prefix="vb-eval-")
    start = time.perf_counter()
    make_benchmark(root, args.per_capability)
    print(f"make-benchmark: {4 * args.per_capability / (time.perf_counter() - start):.1f} samples/s")
    evaluator = CapabilityEvaluator(root, reference_editor("oracle"))
    for capability, method in (("ocr", evaluator.evaluate_ocr_capability),
                               ("spatial", evaluator.evaluate_spatial_reasoning),
                               ("detail", evaluator.evaluate_detail_preservation),
                               ("multi_image", evaluator.evaluate_multi_image_consistency)):
        start = time.perf_counter()
        method()
        print(f"{capability:<12} {args.per_capability / (time.perf_counter() - start):6.1f} samples/s")


if __name__ == "__main__":
    main()
