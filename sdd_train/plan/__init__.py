"""Planning a run before it starts: the memory a training step needs on each rank
(:mod:`sdd_train.plan.memory`, checked against :mod:`sdd_train.plan.measured`) and a model of the
step's time (:mod:`sdd_train.plan.throughput`)."""
