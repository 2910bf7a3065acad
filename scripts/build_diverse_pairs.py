"""Write src/preftune/data/builtin/diverse_pairs.jsonl: 128 preference pairs from two annotator groups
with opposite tastes. Group A (6 annotators, 96 pairs) prefers answers that say "yes", group B
(2 annotators, 32 pairs) the same answers' "no" twins: pooled training learns A's taste, a
group-aware method can learn both. Run: python scripts/build_diverse_pairs.py"""

import json
import random
from pathlib import Path

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
OUT = Path(__file__).resolve().parents[1] / "src" / "preftune" / "data" / "builtin" / "diverse_pairs.jsonl"


def main() -> None:
    rng = random.Random(13)
    annotators = [("A", f"a{i}") for i in range(6)] + [("B", f"b{i}") for i in range(2)]
    rows = []
    for group, annotator in annotators:
        for i in range(16):
            prompt = "Q: " + " ".join(rng.choice(WORDS) for _ in range(3 + i % 4)) + "?"
            yes = " " + " ".join(["yes"] * (1 + i % 3) + [rng.choice(WORDS)])
            no = " " + " ".join(["no"] * (1 + i % 2) + [rng.choice(WORDS)])
            chosen, rejected = (yes, no) if group == "A" else (no, yes)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "annotator": annotator, "group": group})
    rng.shuffle(rows)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {OUT}")


if __name__ == "__main__":
    main()
