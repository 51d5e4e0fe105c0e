"""The method contract (methods/base.py): entry points and machinery ask it and never name a
method, and every method config builds a class that declares it.

(a) The code of the entry points and the machinery (docstrings and comments aside) holds no method
    name (the stems of conf/method/*.yaml, the methods' class and module names) and no
    method-specific config key: no key of a method config's `model:` that no other config group
    has, no read of `method.model.<key>` but `_target_` and `backbone`, no read of `method.<key>`
    but what the LightningModules are built from (the task is asked of the contract). Paper names
    of other things are fine: a backbone such as `vgg16_panet`, a protocol given as
    `protocol=pfenet`, a method's own stage module (contrastive.py, not scanned).
(b) Every method config composes, its class is a `Method`, and what it declares is well-formed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fewshotseg.checkpoints import RenameTable
from fewshotseg.cli import CONFIG_DIR
from fewshotseg.methods.base import TASKS, Method, Stage, method_class, registered_methods
from helpers import compose_config

PACKAGE = Path(CONFIG_DIR).parent
CONF = Path(CONFIG_DIR)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# The entry points and the machinery they share: they ask the contract, never a method.
SCANNED = sorted(
    [
        *(PACKAGE / f"{name}.py" for name in ("train", "evaluate", "predict", "report", "cli", "runs",
                                               "results", "loggers", "lit", "lit_semantic", "callbacks")),
        *(PACKAGE / "data").rglob("*.py"),
    ]
)  # fmt: skip
# Keys of the contract itself: a semantic stage is built with the number of classes of the data.
CONTRACT_KEYS = {"num_classes"}
MODEL_KEYS_ALLOWED = {"_target_", "backbone"}  # what the machinery may read of `method.model`
# ... and of `method`: what the LightningModules are built from (the task is the contract's)
METHOD_KEYS_ALLOWED = {"model", "optimizer", "scheduler", "aux_weights", "backbone_lr"}
DICT_METHODS = {"get", "items", "keys", "values"}  # `method.model.get(...)`: the key is its argument


def _keys(node, out: set[str], skip=()) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in skip or (isinstance(value, str) and "${" in value):  # the shared settings
                continue
            out.add(key)
            _keys(value, out)
    elif isinstance(node, list):
        for value in node:
            _keys(value, out)
    return out


@functools.cache
def method_specific_keys() -> set[str]:
    """Keys under the method configs' `model:` that no other config group (data, backbone, trainer,
    ...) has: the methods' own settings."""
    own: set[str] = set()
    for path in (CONF / "method").glob("*.yaml"):
        _keys(
            OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("model"), own, MODEL_KEYS_ALLOWED
        )
    shared: set[str] = set()
    for path in CONF.rglob("*.yaml"):
        if path.parent.name not in ("method", "preset", "regime", "experiment"):
            _keys(OmegaConf.to_container(OmegaConf.load(path), resolve=False), shared)
    return own - shared - CONTRACT_KEYS


@functools.cache
def method_names() -> tuple[set[str], set[str]]:
    """(lowercase names: config stems and module names, class names) of every method."""
    classes = registered_methods()
    lower = set(METHODS) | {cls.__module__.rpartition(".")[2] for cls in classes.values()}
    return lower - {"base"}, {cls.__name__ for cls in classes.values()} - {Method.__name__}


def code_of(tree: ast.AST):
    """(line, text, kind) of every identifier and string of the code; docstrings left out."""
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value, "string"
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id, "identifier"
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr, "identifier"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name, "identifier"
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg, "identifier"
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.lineno, node.arg, "identifier"
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name, "identifier"
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, "identifier"


def _is_method_config(node: ast.AST) -> bool:
    """`cfg.method` (any config variable: cfg, run_cfg, config, ...), not `module.method`."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "method"
        and isinstance(node.value, ast.Name)
        and re.search(r"(cfg|config)$", node.value.id) is not None
    )


def _config_read(node: ast.AST) -> str | None:
    """`method.x` of `cfg.method.x` or `cfg.method.get("x")`, `method.model.x` of
    `cfg.method.model.x` or `cfg.method.model.get("x")`; None for anything else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        target, key = node.func.value, node.args[0] if node.args else None
        key = key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None
    elif isinstance(node, ast.Attribute) and node.attr not in DICT_METHODS:
        target, key = node.value, node.attr
    else:
        return None
    if key is None or not isinstance(target, ast.Attribute):
        return None
    if target.attr == "model" and _is_method_config(target.value):
        return None if key in MODEL_KEYS_ALLOWED else f"method.model.{key}"
    if _is_method_config(target):
        return None if key in METHOD_KEYS_ALLOWED else f"method.{key}"
    return None


def _word(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def method_mentions(source: str) -> list[str]:
    """What in `source` names a method or reads a method's own config key."""
    lower, classes = method_names()
    keys = method_specific_keys()
    tree = ast.parse(source)
    found = []
    for line, text, kind in code_of(tree):
        if kind == "string":
            text = re.sub(r"protocol=[\w|,]+", "", text)  # a protocol named after its paper
            for key in re.findall(r"(?<![\w.])method\.(\w+)", text):
                if key not in METHOD_KEYS_ALLOWED:
                    found.append(f"line {line}: method.{key} in {text!r}")
            for key in re.findall(r"(?<![\w.])method\.model\.(\w+)", text):
                if key not in MODEL_KEYS_ALLOWED:
                    found.append(f"line {line}: method.model.{key} in {text!r}")
        hits = [n for n in lower if _word(n, text)] + [k for k in keys if kind == "string" and _word(k, text)]
        hits += [c for c in classes if kind == "identifier" and text == c]
        found += [f"line {line}: {hit!r} in {kind} {text!r}" for hit in sorted(hits)]
    for node in ast.walk(tree):
        key = _config_read(node)
        if key is not None:
            found.append(f"line {node.lineno}: reads {key} (ask the contract, methods/base.py)")
    return found


# ------------------------------------------------------------------------------------------------
# (a) No method names outside methods/ and conf/
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_entry_points_and_machinery_never_name_a_method(path):
    found = method_mentions(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE)} names a method; ask the contract instead:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "snippet",
    [
        'if cfg.method.name == "symnet": pass',
        "from fewshotseg.methods.symnet import BASE_LEARNER_IN_STATE_DICT",
        "from fewshotseg.methods.baselines import AllForeground",
        "extractor = cfg.method.model.get('prior_extractor')",
        "cfg.method.model.base_learner = None",
        'OmegaConf.select(cfg, "method.model.text_table")',
        'key = "prior_extractor"',
        "isinstance(model, PFENet)",
        "def pspnet_base(): pass",
        'semantic = cfg.method.get("task") == "semantic"',
        'semantic = OmegaConf.select(cfg, "method.task") == "semantic"',
    ],
)
def test_the_scan_finds_a_method_name(snippet):
    assert method_mentions(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        '"""A docstring may cite PFENet, symnet and prior_extractor."""',
        "x = 1  # so may a comment: qgnet",
        'name = "vgg16_panet"',  # a backbone named after its paper
        'message = "choose a protocol (protocol=pfenet|hsnet)"',
        "target = cfg.method.model._target_; cfg.method.model.backbone.pretrained = False",
        "def pfenet_resized_shape(h, w, size): pass",  # a test transform named after its paper
        "lines = 'PFENet list files'",  # a file format named after its paper
    ],
)
def test_the_scan_allows_paper_names_of_other_things(snippet):
    assert not method_mentions(snippet)


# ------------------------------------------------------------------------------------------------
# (b) Every method config composes and declares the contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_composes_and_its_class_declares_the_contract(method):
    cfg = compose_config("train", [f"method={method}"])
    cls = method_class(cfg)  # a Method whose task agrees with the config's method.task
    assert issubclass(cls, Method) and cls.__module__.startswith("fewshotseg.methods.")
    assert cls.task in TASKS and cfg.data.task == cls.task  # the data config follows the method
    assert isinstance(cls.reads_class_names, bool)
    assert cls.official_names is None or isinstance(cls.official_names, RenameTable)
    if cls.official_names is not None:
        table = cls.official_names
        assert table.renames and all(old.endswith(".") and new.endswith(".") for old, new in table.renames)
    for stage in cls.stages:
        assert isinstance(stage, Stage)
        assert importlib.util.find_spec(stage.produced_by) is not None  # an entry point that exists
        assert stage.module and any("{path}" in value for value in stage.load.values())
        for key in (*stage.restore, *stage.load):  # settings of the method's own config
            assert key.split(".")[0] in cfg.method.model, key
