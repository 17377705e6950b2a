"""Adapters that let diffmem's sampling and scoring code drive model families other than UNets.

- `flux`: a Flux pipeline's transformer behind the UNet call signature (`sample, timestep, encoder_hidden_states,
  added_cond_kwargs`) and its flow-matching scheduler behind the DDIM-style scheduler interface, so Wen et al.'s
  sampling loop (`diffmem.metrics.wen.sample_with_wen_scores`) and the audit run on Flux unchanged.
"""
