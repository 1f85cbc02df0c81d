"""Sweeps: grids of training runs from one YAML (:mod:`.grid`), run locally or as a Slurm array (:mod:`.launch`)."""
