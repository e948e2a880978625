"""The training methods, by ``algo.name``: each a Lightning module on the shared plumbing of
:class:`sdharness.methods.policy.PolicyModule`, implementing only ``losses(batch)``.

Adding a method: a module here with its class, one entry below, and ``conf/algo/<name>.yaml``.
Classes are named as ``module:Class`` so that the config check can list the names without
importing Lightning.
"""

from __future__ import annotations

import importlib

METHODS = {
    "sd": "sdharness.methods.self_distill:SelfDistillModule",
    "sft": "sdharness.methods.sft:SFTModule",
    "grpo": "sdharness.methods.grpo:GRPOModule",
}


def method_class(name: str):
    """The Lightning module class of the method called ``name`` (a key of :data:`METHODS`)."""
    module, attribute = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
