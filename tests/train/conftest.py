"""Fixtures of the trainer tests: a random tiny base and a tiny toy DIP set, built once per session
(defined in ``train_fixtures``, shared with the adversarial tests)."""

from train_fixtures import one_thread, tiny_env  # noqa: F401  (fixtures)
