"""Write a synthetic 'hospital' dataset: features and a 0/1 outcome that depends on them.

usage: make_dataset.py OUT.csv [ROWS] [FIRST_PATIENT]
With FIRST_PATIENT, the first column is `patient`, ids P00001-style numbered from there, and the
rows are drawn with a seed of their own: two files whose id ranges overlap share those patients.
"""

import sys

import numpy as np
import pandas as pd

rows = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
first = int(sys.argv[3]) if len(sys.argv) > 3 else None
rng = np.random.default_rng(42 if first is None else 42 + first)
age = rng.integers(20, 90, rows)
bmi = rng.normal(27, 5, rows).round(1)
bp = rng.normal(130, 15, rows).round(0)
smoker = rng.integers(0, 2, rows)
risk = 0.04 * (age - 50) + 0.1 * (bmi - 27) + 0.03 * (bp - 130) + 0.8 * smoker + rng.normal(0, 0.7, rows)
columns = {"age": age, "bmi": bmi, "bp": bp, "smoker": smoker, "outcome": (risk > 0.5).astype(int)}
if first is not None:
    columns = {"patient": [f"P{n:05d}" for n in range(first, first + rows)], **columns}
pd.DataFrame(columns).to_csv(sys.argv[1], index=False)
