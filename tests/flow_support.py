"""Shared set-up of the dataflow tests: one zygote and enclave worker per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.flow import FlowEnclave
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Dataset, Flow, LocalEngine, open_result

FUNCTIONS = """
def words(line):
    return line.split()

def one(w):
    return (w, 1)

def add(a, b):
    return a + b

def is_long(w):
    return len(w) > 3

def upper(x):
    return x.upper()

def upper_all(it):
    for x in it:
        yield x.upper()

def first_char(w):
    return w[:1]

def length(x):
    return len(x)

def ident(x):
    return x

def neg_len(x):
    return -len(x)

def pair_id(r):
    return (r["id"], r["name"])

def pair_first(r):
    return (r[0], r[1])

def boom(x):
    raise KeyError("secret-" + x)
"""


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start(preimport=())
    yield z
    z.close()


@pytest.fixture(scope="module")
def enclave_identity() -> Identity:
    return Identity.generate("flow-enclave")


@pytest.fixture(scope="module")
def recipient() -> Identity:
    return Identity.generate("recipient")


def make_enclave(zygote: Zygote, identity: Identity, **kw: Any) -> FlowEnclave:
    return FlowEnclave(identity, zygote, **kw)


def run_and_open(
    flow: Flow, actions: dict[str, Dataset], engine: LocalEngine, recipient: Identity, out: Path
) -> dict[str, list[Any]]:
    saved = [ds.save(name) for name, ds in actions.items()]
    flow.run(*saved, engine=engine, recipients=[recipient.public], out_dir=out)
    return {name: open_result(out, name, recipient) for name in actions}
