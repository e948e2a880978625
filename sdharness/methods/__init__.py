"""The training methods, by ``algo.name``: each a Lightning module on the shared plumbing of
:class:`sdharness.methods.policy.PolicyModule`, implementing only ``losses(batch)``.

Adding a method: a module here with its class, one entry below, ``conf/algo/<name>.yaml`` and
``conf/method/<name>.yaml``. Classes are named as ``module:Class`` so that the config check can
list the names without importing Lightning.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """``module_class``: the Lightning module as ``module:Class``. ``reads_reference``: whether training
    reads each problem's worked solution (SD's teacher prompt, SFT's target); a method that does not
    (GRPO: sampled from the problem, rewarded on the answer) needs only problem and answer, and the
    reference's notation cannot change its result."""

    module_class: str
    reads_reference: bool = True


METHODS = {
    "sd": Method("sdharness.methods.self_distill:SelfDistillModule"),
    "sft": Method("sdharness.methods.sft:SFTModule"),
    "grpo": Method("sdharness.methods.grpo:GRPOModule", reads_reference=False),
}


def method_class(name: str):
    """The Lightning module class of the method called ``name`` (a key of :data:`METHODS`)."""
    module, attribute = METHODS[name].module_class.split(":")
    return getattr(importlib.import_module(module), attribute)
