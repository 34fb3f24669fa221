"""Paper reproductions as sweeps (DESIGN decision 13): a config, a runner that skips finished
runs and resumes killed ones, one JSON of every result, PNG plots and Markdown tables.

    python -m jaxaccel.experiments sweep configs/experiments/repetition.yaml [--only NAME] [--dry-run]
    python -m jaxaccel.experiments plot RESULTS.json [--out DIR]
    python -m jaxaccel.experiments report RESULTS.json [--out FILE.md]

Modules: `spec` (sweep files -> runs), `runner` (train, skip, resume, results), `results`
(the results format), `plots`, `report`, `scaling` (the data-constrained scaling law of
Muennighoff et al. and a fit of its R_D* to a sweep).
"""
