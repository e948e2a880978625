"""The config dataclasses of the method's and the run's groups (:mod:`sdharness.config` holds the rest
and composes them into :class:`~sdharness.config.TrainConfig`)."""
