"""CE + budget-loss routers with the temperature annealing working (tau 1 -> 0.05) vs at tau 1
throughout (what the committed docs/duo routers got, the annealing having missed them), on
builtin:duo's base in float32, the experiment's held-out windows and settings. Run from the
repository root: python docs/duo/checks/router_temperature.py 1,2,4,6 OUT.json"""
import json, sys, time
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
half = len(rows) // 2
fit_rows, test_rows = rows[:half], rows[half:]
test_scorer = exp.Scorer(params, cfg, test_rows, 32)
out = []
for b in [int(x) for x in sys.argv[1].split(",")]:
    for tau_end in (1.0, 0.05):
        t0 = time.perf_counter()
        rparams, rcfg, curve = exp.train_router(params, cfg, fit_rows, b, steps=100, tau_end=tau_end, seed=0)
        rparams, delta = exp.calibrate_router(rparams, rcfg, fit_rows, b, batch=32)
        ppl = exp._ppl(test_scorer.free(rparams, rcfg))
        big = float(np.mean(exp.router_big_layers(rparams, rcfg, test_rows, 32)))
        row = {"budget": b, "tau_end": tau_end, "perplexity": ppl, "big_layers": big,
               "seconds": time.perf_counter() - t0,
               "loss_first": curve[0], "loss_last": curve[-1]}
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open(sys.argv[2], "w"), indent=1)
