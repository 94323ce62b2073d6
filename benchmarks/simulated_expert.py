"""Accuracy of the simulated experts on held-out real tiles of the IHC demo and the H&E workspace.

    PYTHONPATH=. python -m benchmarks.simulated_expert

Prints, per workspace, rules and class: the share of held-out (val + test) real tiles judged
plausible when shown as their own class and when shown as the other class, and the verdicts on
noise, blank glass and colour-shifted (channels rolled) real tiles.
"""

import tempfile
from pathlib import Path

import numpy as np

from pathloop.demo import STAIN_CLASSES, demo_workspace
from pathloop.simulate import RULES, fit_expert
from store.images import load_rgb
from store.rewards import real_tiles


def main() -> None:
    print("| workspace | rules | class | held-out tiles | own class plausible | shown as other class plausible |")
    print("|---|---|---|---|---|---|")
    broken_rows = []
    for stain, classes in STAIN_CLASSES.items():
        ws, engine, _ = demo_workspace(Path(tempfile.mkdtemp()), stain)
        held = [t for t in real_tiles(ws, engine) if t.split != "train"]
        for rules in RULES:
            expert = fit_expert(ws, engine, rules)
            for c in classes:
                tiles = [load_rgb(t.path, 32) for t in held if t.class_name == c]
                other = next(o for o in classes if o != c)
                own = np.mean([expert.judge(rgb, c)[0] == "plausible" for rgb in tiles])
                swapped = np.mean([expert.judge(rgb, other)[0] == "plausible" for rgb in tiles])
                print(f"| {stain} | {rules} | {c} | {len(tiles)} | {own:.3f} | {swapped:.3f} |")
            real = [load_rgb(t.path, 32) for t in held]
            broken = {"noise": [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                                for i in range(20)],
                      "blank": [np.full((32, 32, 3), v, np.uint8) for v in range(200, 256, 3)],
                      "colour-shifted": [np.roll(rgb, 1, axis=2) for rgb in real]}
            for kind, tiles in broken.items():
                rate = np.mean([expert.judge(rgb, c)[0] == "plausible" for rgb in tiles for c in classes])
                broken_rows.append(f"| {stain} | {rules} | {kind} | {len(tiles)} | {rate:.3f} |")
        engine.dispose()
    print("\n| workspace | rules | broken tiles | n | plausible (as any class) |\n|---|---|---|---|---|")
    print("\n".join(broken_rows))


if __name__ == "__main__":
    main()
