"""Inputs for the labelling scaling runs: `rows_per_actor x N` rows of the dev CSV (repeated
with new IDs when N actors need more rows than it has), one CSV per actor count.

    python scripts/gpu/scale_data.py DEV.csv OUT_DIR ROWS_PER_ACTOR 1 2 4
"""

import sys

import pandas as pd

src, out, per_actor, counts = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(c) for c in sys.argv[4:]]
dev = pd.read_csv(src)
for n in counts:
    need = per_actor * n
    copies = [dev.assign(ID=dev["ID"].astype(str) + f"-r{k}") for k in range(-(-need // len(dev)))]
    rows = pd.concat(copies, ignore_index=True).head(need)
    rows.to_csv(f"{out}/rows-{n}.csv", index=False)
    print(f"{out}/rows-{n}.csv: {len(rows)} rows")
