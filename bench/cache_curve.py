"""Cache bytes against what the bridge carries: the planner's bytes per 1024^2 image for each cache setting, next to
the information proof's numbers trained and evaluated on caches stored that way (read from bench/results/).

    python bench/cache_curve.py            # the table (markdown)
    python bench/cache_curve.py --json     # one JSON line per setting

Every proof row is paired on its seeds with the bf16 full-view run (prove_bridge_information_full.txt, the same
seeds, data and decoding): the "paired" columns are differences over those seeds (95% Student t over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "prove_bridge_information_full.txt"
# (label, planner options, proof result file or None); the proof's tiny task sees 64x64 at a quarter as 32x32
SETTINGS = [
    ("bf16, DeepStack taps kept", {"cache_deepstack": True}, None),
    ("bf16 (the default)", {}, REFERENCE),
    ("bf16, Qwen3-VL sees 512^2", {"qwen3_area": 512 * 512}, "prove_bridge_information_qwen3_area.txt"),
    ("fp8", {"cache_dtype": "fp8"}, None),  # measured only with the quick recipe (not paired with the full run)
    ("fp8, Qwen3-VL sees 512^2", {"cache_dtype": "fp8", "qwen3_area": 512 * 512},
     "prove_bridge_information_fp8_qwen3_area.txt"),
    ("int8, Qwen3-VL sees 512^2", {"cache_dtype": "int8", "qwen3_area": 512 * 512},
     "prove_bridge_information_int8_qwen3_area.txt"),
    ("int8, Qwen3-VL sees 384^2", {"cache_dtype": "int8", "qwen3_area": 384 * 384}, None),
]
MEASURES = (("read follow", "follow_rate_per_seed"), ("no harm", "no_harm_difference_per_seed"),
            ("saw follow", "vision_follow_rate_per_seed"))


def headline(name: str) -> dict:
    for line in (RESULTS / name).read_text().splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"{name}: no JSON headline line")


def paired(values: list[float], reference: list[float]) -> tuple[float, float, float]:
    difference = np.array(values) - np.array(reference)
    if len(difference) < 2:
        return float(difference.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(difference) - 1) * difference.std(ddof=1) / np.sqrt(len(difference))
    return float(difference.mean()), float(difference.mean() - half), float(difference.mean() + half)


def rows() -> list[dict]:
    from bridgecore.planning.job_cost import plan_job_cost

    reference = headline(REFERENCE)
    out = []
    for label, options, result in SETTINGS:
        row = {"setting": label, "options": options,
               "mb_per_image": round(plan_job_cost(1, 1024, 50, "h100", **options)["cache_mb_per_image"], 1),
               "mb_per_image_cfg": round(plan_job_cost(1, 1024, 50, "h100", cfg=True, **options)["cache_mb_per_image"], 1)}
        if result:
            proof = headline(result)
            seeds = list(proof["config"]["seeds"])
            row.update(seeds=seeds, seeds_formed=proof["seeds_formed"], source=result)
            for name, key in MEASURES:
                values = proof[key]
                matched = [reference[key][reference["config"]["seeds"].index(s)] for s in seeds]
                row[name] = float(np.mean(values))
                row[name + " paired"] = paired(values, matched)
        out.append(row)
    return out


def table(data: list[dict]) -> str:
    lines = ["| caches (planner, per 1024^2 image) | no CFG | CFG | seeds | formed (read) | read follow | no harm | "
             "saw follow |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in data:
        cells = [row["setting"], f"{row['mb_per_image']} MB", f"{row['mb_per_image_cfg']} MB"]
        if "seeds" in row:
            cells += [",".join(map(str, row["seeds"])), f"{row['seeds_formed']} of {len(row['seeds'])}"]
            for name, _ in MEASURES:
                mean, low, high = row[name + " paired"]
                value = f"{row[name] * 100:+.1f} pts" if name == "no harm" else f"{row[name] * 100:.1f}%"
                cells.append(value if row["source"] == REFERENCE else
                             f"{value} (paired {mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}])")
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per setting instead of the table")
    args = parser.parse_args()
    data = rows()
    if args.json:
        for row in data:
            print(json.dumps(row))
    else:
        print(table(data))


if __name__ == "__main__":
    main()
