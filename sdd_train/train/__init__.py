"""Training: the loop (:mod:`.trainer`), the train module (:mod:`.train_module`), the callbacks around
it (:mod:`.callbacks`), optimizer and schedule (:mod:`.optim`), and starting a run (:mod:`.launch`)."""
