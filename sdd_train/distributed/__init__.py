"""Processes and parallelism: the world of ranks and its collectives (:mod:`.world`), its parallel
dimensions and their mesh (:mod:`.dims`), and activation checkpointing, compile and FSDP2 applied to a
plain model as the model describes it (:mod:`.parallelize`). Imports config, kernels and torch only."""
