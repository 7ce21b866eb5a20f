"""Train a gradient-boosted tree model (XGBoost) on a sealed CSV, inside the enclave's sandbox.

Inputs:  data    - CSV with numeric feature columns and a 0/1 column named by params["label"]
Outputs: report  - JSON with row count, features and held-out accuracy
         model   - the trained model (XGBoost JSON)
"""

import json


def run(ctx):
    import numpy as np
    import pandas as pd
    import xgboost as xgb

    label = ctx.params.get("label", "label")
    frame = pd.read_csv(ctx.inputs["data"])
    features = [c for c in frame.columns if c != label]
    rng = np.random.default_rng(int(ctx.params.get("seed", 0)))
    test = rng.random(len(frame)) < 0.25
    model = xgb.XGBClassifier(
        n_estimators=int(ctx.params.get("rounds", 20)), max_depth=4, n_jobs=1, tree_method="hist"
    )
    model.fit(frame.loc[~test, features], frame.loc[~test, label])
    accuracy = float((model.predict(frame.loc[test, features]) == frame.loc[test, label]).mean())
    report = {
        "rows": len(frame),
        "features": features,
        "held_out_rows": int(test.sum()),
        "accuracy": accuracy,
    }
    ctx.outputs["report"].write(json.dumps(report, indent=2).encode())
    ctx.outputs["model"].write(bytes(model.get_booster().save_raw("json")))
