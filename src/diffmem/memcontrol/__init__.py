"""MemControl (Dutt et al. 2025, "MemControl: Mitigating Memorization in Diffusion Models via Automated Parameter
Selection"): choose which parameters of a `diffusers.UNet2DConditionModel` a fine-tune may change, so that it
learns the private data without copying it.

- `mask`: the search space, derived from the UNet (attention blocks or attention layers), and mask files;
- `svdiff`, `difffit`, `attention`, `lora`: the PEFT methods, each with a config dataclass; `methods` puts them
  behind one interface (inject under a mask, list what trains, merge back);
- `train`: fine-tunes the diffmem world with a method, a mask and a mitigation (random word addition, Wen's
  threshold), through `diffmem.world.train`'s loop;
- `search`: the bi-level search (Optuna NSGA-II over masks, memorization and FID as objectives).
"""
