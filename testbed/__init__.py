"""The testbed's builder: pretraining the shipped bases (``python -m testbed.pretrain`` from a checkout).
Not part of the installed package; the bases it made ship in ``sdharness/assets``."""
