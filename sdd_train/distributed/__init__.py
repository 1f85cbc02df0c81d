"""Processes and parallelism: the world of ranks and its collectives (:mod:`.world`), and activation
checkpointing, compile and FSDP2 applied to a plain model (:mod:`.parallelize`)."""
