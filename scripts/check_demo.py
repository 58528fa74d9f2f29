"""Check the demo's claims on its eval.json (run by CI after `make demo`): the vision gain (accuracy minus blind
accuracy) is at least 30 points on colour and shape and positive on count and relation, within 10 minutes."""

import json
import sys

MIN_GAIN = {"colour": 0.30, "shape": 0.30, "count": 1e-9, "relation": 1e-9}
MAX_SECONDS = 600


def main(path: str) -> int:
    with open(path) as f:
        result = json.load(f)
    failures = []
    for task, floor in MIN_GAIN.items():
        t = result["tasks"][task]
        gain = t["accuracy"] - t["blind_accuracy"]
        print(f"{task:<9} accuracy {t['accuracy']:.3f}  blind {t['blind_accuracy']:.3f}  gain {gain:+.3f}")
        if gain < floor:
            failures.append(f"{task}: vision gain {gain:+.3f} below {floor:.2f}")
    total = result["time_s"]["total"]
    print(f"demo time {total:.0f} s (limit {MAX_SECONDS} s)")
    if total > MAX_SECONDS:
        failures.append(f"demo took {total:.0f} s, over {MAX_SECONDS} s")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/eval.json"))
