"""Every policy family satisfies the policy contract the trainers call (`policies.protocol.Policy`):
each member exists, with a signature that accepts every call the protocol allows."""

from __future__ import annotations

import inspect
from typing import Protocol

import pytest
import torch

from grpo.reward_modeling import _Trainable
from policies.ltx import LTXPolicy
from policies.ltx2 import LTX2Policy
from policies.nextclip import NextClipLTX2Policy, NextClipPolicy
from policies.nsp import NSPLTX2Policy, NSPPolicy
from policies.protocol import Policy, Trainable

FAMILIES = [LTXPolicy, LTX2Policy, NSPPolicy, NSPLTX2Policy, NextClipPolicy, NextClipLTX2Policy]
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _members(protocol: type) -> dict[str, type]:
    """Member name -> the protocol class declaring it (data members declared by annotation only)."""
    members = {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or not getattr(base, "_is_protocol", False):
            continue
        names = set(base.__dict__.get("__annotations__", {})) | {
            n for n in base.__dict__ if not n.startswith("_")
        }
        members.update(dict.fromkeys(names, base))
    return members


def _call_problems(expected: inspect.Signature, actual: inspect.Signature) -> list[str]:
    """Why a method with signature ``actual`` cannot take every call ``expected`` allows."""
    problems = []
    have = actual.parameters
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in have.values())
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in have.values())
    for name, want in expected.parameters.items():
        got = have.get(name)
        if got is None:  # taken by *args / **kwargs (e.g. nn.Module.to), or not at all
            if not (var_keyword and (var_positional or want.kind is inspect.Parameter.KEYWORD_ONLY)):
                problems.append(f"no parameter {name!r}")
            continue
        if want.kind in POSITIONAL and got.kind not in POSITIONAL:
            problems.append(f"{name!r} is not positional")
        if want.kind is inspect.Parameter.KEYWORD_ONLY and got.kind is inspect.Parameter.POSITIONAL_ONLY:
            problems.append(f"{name!r} cannot be passed by keyword")
        if want.default is not inspect.Parameter.empty and got.default is inspect.Parameter.empty:
            problems.append(f"{name!r} has no default")
    wanted_positional = [n for n, p in expected.parameters.items() if p.kind in POSITIONAL]
    got_positional = [n for n, p in have.items() if p.kind in POSITIONAL]
    if not var_positional and got_positional[: len(wanted_positional)] != wanted_positional:
        problems.append(f"positional parameters {got_positional} instead of {wanted_positional}")
    for name, got in have.items():
        if (
            name not in expected.parameters
            and got.kind not in VARIADIC
            and got.default is inspect.Parameter.empty
        ):
            problems.append(f"extra required parameter {name!r}")
    return problems


def protocol_problems(cls: type, protocol: type) -> list[str]:
    """What ``cls`` lacks to satisfy ``protocol``: missing members and incompatible signatures."""
    problems = []
    init = inspect.signature(cls.__init__).parameters
    for name, declared in sorted(_members(protocol).items()):
        want = inspect.getattr_static(declared, name, None)
        if want is None:  # a data member: the constructor takes it
            if name not in init:
                problems.append(f"{name}: not set by the constructor")
            continue
        got = inspect.getattr_static(cls, name, None)
        if got is None:
            problems.append(f"{name}: missing")
        elif isinstance(want, property):
            if not isinstance(got, property):
                problems.append(f"{name}: not a property")
        elif isinstance(want, classmethod) != isinstance(got, classmethod):
            problems.append(f"{name}: classmethod mismatch")
        else:
            expected, actual = (
                inspect.signature(getattr(declared, name)),
                inspect.signature(getattr(cls, name)),
            )
            problems += [f"{name}: {p}" for p in _call_problems(expected, actual)]
    return problems


@pytest.mark.parametrize("family", FAMILIES, ids=lambda c: c.__name__)
def test_every_policy_family_satisfies_the_policy_protocol(family):
    assert protocol_problems(family, Policy) == []


def test_the_reward_models_trainable_satisfies_what_training_state_needs():
    assert protocol_problems(_Trainable, Trainable) == []


def test_the_check_reports_missing_members_and_incompatible_signatures():
    class Broken(LTXPolicy):
        def decode(self, latents, latent_shape, batch_size=8, *, scale):  # an extra required argument
            return latents

        def rollout(self, condition, num_generations=1):  # sampling and seeds not accepted
            return None

        def log_prob(self, rollout, step, guidance_scale):  # no default for the keyword
            return None

    problems = protocol_problems(Broken, Policy)
    assert "decode: extra required parameter 'scale'" in problems
    assert "rollout: no parameter 'sampling'" in problems and "rollout: no parameter 'seeds'" in problems
    assert "log_prob: 'guidance_scale' has no default" in problems
    assert len(problems) == 4

    class Bare:
        def __init__(self, vae) -> None:
            self.vae = vae

    bare = protocol_problems(Bare, Policy)
    assert "transformer: not set by the constructor" in bare and "log_prob: missing" in bare


def test_the_protocol_is_runtime_checkable_on_a_policy_object():
    class Minimal(torch.nn.Module):
        """Has every member name (the runtime check looks for names only)."""

    for name in _members(Policy):
        setattr(Minimal, name, lambda *args, **kwargs: None)
    assert isinstance(Minimal(), Policy) and not isinstance(torch.nn.Linear(1, 1), Policy)
