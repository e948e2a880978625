"""Builders of the shipped data sets (``sdharness/assets``, ``evals/tasks``), run from a checkout
(``python -m scripts.<module>``); they are not part of the installed package."""
