"""Model zoos: populations of small trained models, their on-disk store and metrics, and weight generators.

    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import load_zoo_spec
    from weightspace.zoo.store import Zoo
    build_zoo(load_zoo_spec("examples/zoo/digits-tasks.yaml"), "runs/zoo")   # trains what is missing
    Zoo("runs/zoo").final_rows()          # the catalog: one row per model's last checkpoint

The modules: `arch` (small architectures), `data` (bundled datasets and their
variants), `spec`, `train` and `build` (batched training on local processes or
Ray, through `executors`), `store` (the on-disk zoo), `metrics`, `survey` and
`phases` (loss-landscape metrics), `bind` and `search` (data for statistics,
coefficient search), `tiny` (synthetic checkpoints), and `gen` (weight
generators trained on a zoo).
"""
