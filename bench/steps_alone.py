"""Training steps alone, from a bench_dpo.py result: each run's time without its pre-pass charge.

    python3 bench/steps_alone.py bench/results/gpu-0.5b-h200-compile.json

Runs recorded before the pre-pass was charged at its steady cost charged it whole, in
proportion to pairs (`warmup + steps` steps' worth, `steps` of them charged); this takes that
share back out, so what is left is the measured steps' own wall time.
"""

import json
import sys


def main(path: str) -> None:
    report = json.load(open(path))
    shape = report["shape"]
    steps, total = shape["steps"], shape["warmup"] + shape["steps"]
    tokens = steps * shape["batch"] * 2 * (shape["prompt_len"] + shape["response_len"])
    alone = {}
    for name, runs in report["runs"].items():
        run = runs[0]
        charged = run.get("prepass_charged_seconds", run["prepass_seconds"] * steps / total)
        alone[name] = run["seconds"] - charged
    for name, seconds in alone.items():
        line = f"{name:<22} {seconds / steps * 1000:6.0f} ms/step {tokens / seconds:>9,.0f} tokens/s"
        if report["device"] == "cuda":
            line += f"  MFU {8 * report['parameters'] * tokens / seconds / 989e12:.1%}"
        for other, other_seconds in alone.items():
            if name.startswith("preftune") and not other.startswith("preftune"):
                line += f"  {other_seconds / seconds:.2f}x {other}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
