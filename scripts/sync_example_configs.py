"""Insert the TrainConfig fields missing from the train: section of the full example configs (those
that list every setting), with their help text: python scripts/sync_example_configs.py"""
from pathlib import Path
from preftune.config import TrainConfig, commented_yaml
lines = commented_yaml(TrainConfig, indent=2).splitlines()
chunks, cur = [], []
for l in lines:
    cur.append(l)
    if not l.lstrip().startswith("#"):
        chunks.append((l.split(":")[0].strip(), cur)); cur = []
n = 0
for p in sorted(Path("configs").rglob("*.yaml")):
    text = p.read_text().splitlines()
    if not any(l.startswith("  progress_bar:") for l in text):
        continue
    try:
        start = text.index("train:")
    except ValueError:
        continue
    end = next((k for k in range(start + 1, len(text)) if text[k] and not text[k].startswith(" ")), len(text))
    section = text[start + 1:end]
    present = {l.split(":")[0].strip() for l in section if not l.lstrip().startswith("#") and ":" in l}
    prev = None
    changed = False
    for key, chunk in chunks:
        if key not in present:
            # insert after the key line of prev (or at the section start)
            sec_keys = [i for i, l in enumerate(section) if not l.lstrip().startswith("#") and l.split(":")[0].strip() == prev]
            at = sec_keys[0] + 1 if sec_keys else 0
            section[at:at] = chunk
            present.add(key); changed = True
        prev = key
    if changed:
        text[start + 1:end] = section
        p.write_text("\n".join(text) + "\n"); n += 1
print(n, "configs updated")
