"""`diffmem bench`: does BAF remove memorization better than cheaper filters at the same cost to quality?

`grid` says what runs (world fine-tunes, filter variants), `evaluate` measures one model, `run` drives the grid
resumably, `channels` ablates single channels for ground truth, `report` writes docs/results.md.
"""
