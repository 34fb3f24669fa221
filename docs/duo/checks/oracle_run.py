"""The at-most-b oracle's figure vs its per-token routes run together, on builtin:duo (float32)
and the experiment's 12 test windows of 256 tokens (configs/duo.yaml's held-out split, 24 rows).
Run from the repository root: python docs/duo/checks/oracle_run.py OUT.json"""
import json, sys
import numpy as np
import jaxaccel
from jaxaccel.config import build
from jaxaccel.experiments import duo as exp
from jaxaccel.experiments.skipdecode import heldout_rows
from jaxaccel.model.transformer import canonical_params
from jaxaccel.train.config import RunConfig

lm = jaxaccel.load("builtin:duo", dtype="float32")
cfg = lm.config
params = canonical_params(lm.params, cfg)
rows = heldout_rows(build(RunConfig, "configs/duo.yaml").data, 256, 24, model=lm)
test_rows = rows[len(rows) // 2:]
sc = exp.Scorer(params, cfg, test_rows, 32)
patterns = exp.all_patterns(cfg.n_layers)
test = sc.patterns(patterns)
out = {"all_big": exp._ppl(test[exp.n_big(patterns) == cfg.n_layers][0]), "budgets": []}
for b in range(cfg.n_layers + 1):
    loss, idx = exp.oracle(test, patterns, b)
    run = exp._ppl(sc.routed(patterns[idx].reshape(len(test_rows), 256, cfg.n_layers)))
    out["budgets"].append({"b": b, "oracle": exp._ppl(loss), "oracle_run": run})
    print(json.dumps(out["budgets"][-1]), flush=True)
print(json.dumps({"all_big": out["all_big"]}))
json.dump(out, open(sys.argv[1], "w"), indent=1)
