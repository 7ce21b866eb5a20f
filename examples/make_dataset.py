"""Write a synthetic 'hospital' dataset: features and a 0/1 outcome that depends on them."""

import sys

import numpy as np
import pandas as pd

rows = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
rng = np.random.default_rng(42)
age = rng.integers(20, 90, rows)
bmi = rng.normal(27, 5, rows).round(1)
bp = rng.normal(130, 15, rows).round(0)
smoker = rng.integers(0, 2, rows)
risk = 0.04 * (age - 50) + 0.1 * (bmi - 27) + 0.03 * (bp - 130) + 0.8 * smoker + rng.normal(0, 0.7, rows)
pd.DataFrame(
    {"age": age, "bmi": bmi, "bp": bp, "smoker": smoker, "outcome": (risk > 0.5).astype(int)}
).to_csv(sys.argv[1], index=False)
