"""ludwig_mt/patches/registry.py and core.py: the table is complete and true, the helper is the only way in, the
stacking order is explicit, the switches mean the same everywhere, and an untested version stops with one line."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches import core, model_loading, registry
from ludwig_mt.patches.core import ALWAYS, EXPLICIT, Patch, Switch

REPO = Path(__file__).resolve().parents[3]
PROJECT_SOURCE = ("ludwig_mt", "prep", "eval", "workflow", "bench")
ESCAPE = "LUDWIG_MT_ALLOW_UNTESTED_VERSIONS"


# ------------------------------------------------------------------------------------------------- the table
def test_every_target_exists_in_the_installed_pinned_versions() -> None:
    pins = pinned_versions()
    installed = core.installed_versions()
    for package in core.KNOWN_VERSIONS:
        assert installed[package] == pins[package], package  # this test runs on the pinned versions
    for patch in registry.PATCHES:
        for target in patch.targets:
            owner, attr = core.resolve(target)
            assert hasattr(owner, attr), target
            assert core.original(target) is not None, target


def pinned_versions() -> dict[str, str]:
    """package -> its ``==`` pin in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name, _, pinned = requirement.partition("==")
        pins[name.split("[")[0].strip()] = pinned.strip()
    return pins


def test_the_known_set_holds_the_pins_and_the_gpu_image() -> None:
    pins = pinned_versions()
    gpu_image = {"torch": "2.11.0+cu130", "transformers": "5.17.1", "peft": "0.21.0", "accelerate": "1.15.0",
                 "ludwig": pins["ludwig"], "bitsandbytes": pins["bitsandbytes"], "deepspeed": pins["deepspeed"]}
    assert set(core.KNOWN_VERSIONS) <= set(pins)
    assert core.version_problem({p: pins[p] for p in core.KNOWN_VERSIONS}) is None
    assert core.version_problem(gpu_image) is None
    assert core.version_problem({"ludwig": "0.17.11"}) is not None  # Ludwig: exactly the pinned release
    assert core.version_problem({"torch": "2.12.0"}) is not None and core.version_problem({"torch": "2.14.3"}) is None
    assert core.version_problem({"deepspeed": None}) is None  # not installed: nothing of it is checked


def test_names_are_unique_and_every_kind_has_its_module() -> None:
    names = [p.name for p in registry.PATCHES]
    assert len(names) == len(set(names))
    assert {p.kind for p in registry.PATCHES} == set(core.KINDS)
    modules = {"fix": "fixes", "speed-up": "speedups", "distributed": "distributed", "instrumentation": "instrumentation"}
    for patch in registry.PATCHES:
        assert patch.body.__module__ == f"ludwig_mt.patches.{modules[patch.kind]}", patch.name


def test_speedup_names_are_the_patch_names() -> None:
    from ludwig_mt.patches import speedups

    assert set(speedups.SPEEDUPS) == {p.name for p in registry.PATCHES if p.kind == "speed-up"}


def test_stacking_order_of_attributes_replaced_more_than_once() -> None:
    """The table's order is the order of the layers: a later patch wraps an earlier one."""
    trainer, llm = "ludwig.trainers.trainer:Trainer", "ludwig.models.llm:LLM"
    assert registry.stacking() == {
        "ludwig.api:LudwigModel.train": ["refuse_quantized_training_without_cuda", "accept_declared_backend_section",
                                         "refuse_incompatible_strategy"],
        f"{llm}.forward": ["unpacked_forward_instead_of_broken_packing", "target_only_logits", "pack_training_rows",
                           "response_only_eval_logits"],
        f"{trainer}._train_loop": ["resume_mid_epoch_where_it_stopped", "write_training_progress", "write_rank_report"],
        f"{trainer}.save_checkpoint": ["resume_mid_epoch_where_it_stopped", "write_training_progress",
                                       "crash_drill_after_checkpoint"],
        # fused_lora_mlp after liger_kernels: Liger's SwiGLU forward is its fallback
        model_loading.TARGET: ["bf16_weights", "sdpa_attention", "liger_kernels", "varlen_attention", "fused_lora_mlp",
                               "place_quantized_model_on_local_rank"],
        f"{trainer}._forward_pass": ["target_only_logits", "bf16_autocast"],
        f"{trainer}._update_training_metrics": ["target_only_logits", "sampled_train_metrics"],
        f"{trainer}.train_step": ["release_each_steps_graph_when_it_returns", "bf16_autocast", "write_training_progress",
                                  "write_rank_report", "record_step_losses"],
        f"{trainer}.train": ["write_rank_report", "gather_weights_after_sharded_training"],
    }


LAYERS_WITH_EVERY_SWITCH_ON = """
import json, sys
import ludwig.api  # the import hook applies every patch whose switch is on
from ludwig_mt.patches import core, model_loading, registry
registry.apply("record_step_losses")
rules = [getattr(r, "__name__", "?") for r in model_loading._KWARGS_RULES]
print(json.dumps({"layers": core.layers(), "applied": core.applied(), "rules": rules}))
"""


@pytest.mark.slow  # a fresh interpreter importing Ludwig
def test_the_patches_stack_at_run_time_in_the_table_order(tmp_path: Path) -> None:
    env = {**os.environ, "LUDWIG_MT_STRATEGY": "zero3", "LUDWIG_MT_RANK_REPORT": str(tmp_path),
           "LUDWIG_MT_CRASH_AFTER_CHECKPOINT": "99", "LUDWIG_MT_NO_FIXES": "0",
           "LUDWIG_MT_PROGRESS_FILE": str(tmp_path / "progress.jsonl"), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", LAYERS_WITH_EVERY_SWITCH_ON], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["applied"] == [p.name for p in registry.PATCHES], "every switch on: all, in table order"
    expected = registry.stacking()
    loader = expected.pop(model_loading.TARGET)
    assert seen["layers"][model_loading.TARGET] == loader[:1]  # one stand-in, installed by the first of them
    assert seen["rules"] == ["bf16_load_rule", "sdpa_load_kwargs", "rank_device_map"]
    assert {t: names for t, names in seen["layers"].items() if len(names) > 1} == expected  # each patch once
    assert set(seen["layers"]) == {t for p in registry.PATCHES for t in p.targets}


def test_the_readme_table_is_the_registry_output() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert registry.render_table() in readme


def test_python_m_ludwig_mt_patches_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "ludwig_mt.patches"], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == registry.render_table()
    for patch in registry.PATCHES:
        assert f"| `{patch.name}` |" in out.stdout
    assert out.stderr.startswith("installed versions are known: ludwig 0.17.10")


# ------------------------------------------------------------------------------------------------- the helper
def foreign_names(tree: ast.AST, project: set[str]) -> set[str]:
    """Names bound in ``tree`` to third-party modules or their objects: by imports (any scope), and by plain
    aliases of those (``x = mod.Class``; ``for cls in (mod.A, mod.B)``; ``importlib.import_module("pkg")``)."""
    def third_party(module: str | None, level: int = 0) -> bool:
        top = (module or "").split(".")[0]
        return level == 0 and bool(top) and top not in project and top not in sys.stdlib_module_names

    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if third_party(a.name)}
        elif isinstance(node, ast.ImportFrom) and third_party(node.module, node.level):
            names |= {a.asname or a.name for a in node.names}

    def refers(value: ast.AST) -> bool:
        if isinstance(value, ast.BoolOp):  # ``sys.modules.get("pkg.mod") or importlib.import_module("pkg.mod")``
            return any(refers(v) for v in value.values)
        if isinstance(value, (ast.Tuple, ast.List)):
            return bool(value.elts) and all(refers(v) for v in value.elts)
        if isinstance(value, ast.Call):
            func = ast.unparse(value.func)
            arg = value.args[0] if value.args else None
            return (func in ("importlib.import_module", "__import__", "sys.modules.get") and isinstance(arg, ast.Constant)
                    and third_party(str(arg.value)))
        return root(value) in names

    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            pairs = []
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.For, ast.comprehension)):
                pairs = [(node.target, node.iter.elts[0])] if isinstance(node.iter, (ast.Tuple, ast.List)) and \
                    node.iter.elts and all(refers(e) for e in node.iter.elts) else []
            for target, value in pairs:
                if isinstance(target, ast.Name) and target.id not in names and refers(value):
                    names.add(target.id)
                    changed = True
    return names


def root(expr: ast.AST) -> str | None:
    """``a`` for ``a.b.c`` (attributes only: a call or subscript makes a new object, not the imported one)."""
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def foreign_assignments(source: str, project: set[str]) -> list[str]:
    """Every ``x.attr = ...`` / ``del x.attr`` / ``setattr(x, ...)`` in ``source`` whose ``x`` is a third-party module or
    object (see :func:`foreign_names`), as ``line: code``."""
    tree = ast.parse(source)
    foreign = foreign_names(tree, project)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("setattr", "delattr", "object.__setattr__"):
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        flat = [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]
        if any(isinstance(t, ast.Attribute) and root(t) in foreign for t in flat):
            found.append(f"{node.lineno}: {ast.unparse(node)[:120]}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def project_modules() -> set[str]:
    return {*PROJECT_SOURCE, "tests", *(p.stem for p in (REPO / "bench").glob("*.py"))}


def test_the_scan_finds_monkeypatches_however_they_are_written() -> None:
    snippet = """
import importlib, os, sys
from ludwig.trainers.trainer import Trainer
from ludwig.schema.llms import peft
import ludwig.models.llm as llm_module
from ludwig_mt.patches.core import rebind
def patch():
    Trainer.train_step = None
    Trainer.train, Trainer._train_loop = 1, 2
    setattr(llm_module.LLM, "forward", None)
    for cls in (peft.NamedAdaptersConfigField, peft.MergeAdaptersConfigField):
        cls._jsonschema_type_mapping = None
    cli = sys.modules.get("ludwig.cli") or importlib.import_module("ludwig.cli")
    cli.main = None
    sys.argv = []  # the standard library: not a third-party patch
    os.environ.x = 1
    rebind("ludwig.cli:main", lambda original: original)  # the helper: fine
    self_made = Trainer()
    self_made.anything = 1  # an instance: fine
"""
    found = foreign_assignments(snippet, project_modules())
    assert sorted(int(line.split(":")[0]) for line in found) == [8, 9, 10, 12, 14], found


def test_no_foreign_attribute_is_assigned_outside_the_registry_helper() -> None:
    files = sorted(p for d in PROJECT_SOURCE for p in (REPO / d).rglob("*.py"))
    assert len(files) > 40 and REPO / "ludwig_mt/patches/core.py" in files
    offenders = {str(p.relative_to(REPO)): found for p in files
                 if (found := foreign_assignments(p.read_text(encoding="utf-8"), project_modules()))}
    assert offenders == {}, f"patch through ludwig_mt.patches.core.rebind and declare it in the registry: {offenders}"


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch):
    """A fake third-party module and the helper's bookkeeping emptied, so the real patches stay untouched."""
    module = types.ModuleType("fake_upstream")

    class Thing:
        @staticmethod
        def build(x):
            return f"build({x})"

        def run(self):
            return "run"

    module.Thing = Thing
    monkeypatch.setitem(sys.modules, "fake_upstream", module)
    for name, value in (("_LAYERS", {}), ("_ORIGINALS", {}), ("_APPLIED", {}), ("_APPLYING", [])):
        monkeypatch.setattr(core, name, value)
    monkeypatch.setattr(core, "_VERSIONS_CHECKED", [True])
    return module


def fake_patch(name: str, targets: tuple[str, ...], body=lambda: None, switch: Switch = ALWAYS) -> Patch:
    return Patch(name, targets, "a test patch", "fix", switch, body)


def test_rebind_stacks_layers_keeps_static_methods_and_remembers_the_original(sandbox) -> None:
    def outer(original):
        return lambda x: f"outer({original(x)})"

    inner = fake_patch("inner", ("fake_upstream:Thing.build",),
                       lambda: core.rebind("fake_upstream:Thing.build", lambda original: lambda x: f"inner({original(x)})"))
    wrapper = fake_patch("outer", ("fake_upstream:Thing.build",), lambda: core.rebind("fake_upstream:Thing.build", outer))
    first = sandbox.Thing.build
    assert core.apply_patch(inner) and core.apply_patch(wrapper) and not core.apply_patch(inner)  # once each
    assert sandbox.Thing.build(1) == "outer(inner(build(1)))" == sandbox.Thing().build(1)  # still static
    assert core.layers() == {"fake_upstream:Thing.build": ["inner", "outer"]}
    assert core.original("fake_upstream:Thing.build") is first and core.applied() == ["inner", "outer"]


def test_a_patch_whose_body_re_enters_the_hook_is_applied_once(sandbox) -> None:
    """Rebinding ``ludwig.cli:main`` imports ``ludwig.cli``, whose import hook applies the CLI patches: the same patch,
    still running. It must not wrap the attribute twice."""
    def body() -> None:
        core.apply_patch(reentrant)  # what the import hook does while the target's module loads
        core.rebind("fake_upstream:Thing.run", lambda original: lambda self: f"once({original(self)})")

    reentrant = fake_patch("reentrant", ("fake_upstream:Thing.run",), body)
    assert core.apply_patch(reentrant)
    assert sandbox.Thing().run() == "once(run)" and core.layers() == {"fake_upstream:Thing.run": ["reentrant"]}


def test_rebind_refuses_a_target_its_patch_does_not_declare(sandbox) -> None:
    with pytest.raises(RuntimeError, match="no patch of the registry"):
        core.rebind("fake_upstream:Thing.run", lambda original: original)
    other = fake_patch("other", ("fake_upstream:Thing.build",))
    with core.applying(other), pytest.raises(RuntimeError, match="does not declare it"):
        core.rebind("fake_upstream:Thing.run", lambda original: original)
    assert sandbox.Thing().run() == "run" and core.layers() == {}
    with pytest.raises(AttributeError, match="no 'gone'"):
        core.resolve("fake_upstream:Thing.gone")


# ------------------------------------------------------------------------------------------------ the switches
def test_apply_all_honours_no_fixes_patches_off_and_each_switch(sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    table = tuple(fake_patch(name, ("fake_upstream:Thing.run",), lambda name=name: ran.append(name), switch)
                  for name, switch in (("a", ALWAYS), ("b", ALWAYS), ("off", Switch("never", lambda: False)),
                                       ("by_name", EXPLICIT), ("c", ALWAYS)))
    monkeypatch.setattr(registry, "PATCHES", table)
    monkeypatch.setattr(registry, "BY_NAME", {p.name: p for p in table})
    monkeypatch.setenv("LUDWIG_MT_NO_FIXES", "1")
    assert registry.apply_all() == [] and ran == []
    monkeypatch.setenv("LUDWIG_MT_NO_FIXES", "0")
    monkeypatch.setenv("LUDWIG_MT_PATCHES_OFF", "b")
    assert registry.apply_all() == ["a", "c"] and ran == ["a", "c"]
    assert registry.apply_all() == []  # once per process
    assert registry.apply("by_name") and ran == ["a", "c", "by_name"]
    monkeypatch.setenv("LUDWIG_MT_PATCHES_OFF", "b,typo")
    with pytest.raises(WorkflowError, match="typo: no such patch"):
        registry.apply_all()


def test_every_switch_is_documented_in_the_table() -> None:
    table = registry.render_table()
    for variable in ("LUDWIG_MT_NO_FIXES", "LUDWIG_MT_PATCHES_OFF", ESCAPE, "LUDWIG_MT_SPEEDUPS",
                     "LUDWIG_MT_SPEEDUPS_OFF", "LUDWIG_MT_STRATEGY", "LUDWIG_MT_RANK_REPORT",
                     "LUDWIG_MT_CRASH_AFTER_CHECKPOINT"):
        assert variable in table, variable


WORKER_PATCHES = """
import atexit, sys
from ludwig_mt import launch
from ludwig_mt.patches import core
atexit.register(lambda: print("APPLIED", len(core.applied())))
launch.worker(["--version"])
"""


@pytest.mark.slow  # fresh interpreters importing Ludwig
def test_the_launchers_worker_honours_no_fixes_like_every_other_process() -> None:
    counts = {}
    for raw in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LUDWIG_MT_STRATEGY")}
        out = subprocess.run([sys.executable, "-c", WORKER_PATCHES], capture_output=True, text=True, timeout=300,
                             env={**env, "LUDWIG_MT_NO_FIXES": raw})
        counts[raw] = [line for line in out.stdout.splitlines() if line.startswith("APPLIED")]
    assert counts["1"] == ["APPLIED 0"]
    automatic = [p for p in registry.PATCHES  # opt-in speed-ups are installed too, and used only when asked for
                 if p.switch.text in (ALWAYS.text, registry.SPEEDUP.text)]
    assert counts["0"] == [f"APPLIED {len(automatic)}"]


# ------------------------------------------------------------------------------------------ the version guard
def test_an_untested_version_stops_with_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "installed_versions", lambda: {"ludwig": "0.18.0", "torch": "2.14.1", "peft": None})
    monkeypatch.setattr(core, "_VERSIONS_CHECKED", [])
    monkeypatch.delenv(ESCAPE, raising=False)
    ran: list[str] = []
    with pytest.raises(core.UntestedVersionError) as err:
        core.apply_patch(fake_patch("never_applied", ("fake_upstream:Thing.run",), lambda: ran.append("x")))
    message = str(err.value)
    assert "\n" not in message and ran == []
    assert "ludwig 0.18.0 (known: 0.17.10)" in message and f"{ESCAPE}=1" in message and "torch" not in message


def test_the_escape_variable_applies_the_patches_anyway(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(core, "installed_versions", lambda: {"transformers": "6.0.0"})
    monkeypatch.setattr(core, "_VERSIONS_CHECKED", [])
    monkeypatch.setenv(ESCAPE, "1")
    core.guard_versions()
    assert "untested versions: transformers 6.0.0 (known: 5.24, 5.17)" in caplog.text


def fake_distribution(folder: Path, name: str, version: str) -> Path:
    """A ``<name>-<version>.dist-info`` that ``importlib.metadata`` finds first when ``folder`` leads sys.path."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("command", [["-m", "ludwig_mt.patches"], ["-c", "import ludwig.cli; print('LOADED')"]],
                         ids=["python -m ludwig_mt.patches", "the import hook"])
def test_another_installed_ludwig_stops_the_project_with_one_line(tmp_path: Path, command: list[str]) -> None:
    fake = fake_distribution(tmp_path, "ludwig", "0.18.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(fake), str(REPO))), "LUDWIG_MT_NO_FIXES": "0"}
    env.pop(ESCAPE, None)
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 2 and "LOADED" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: untested versions: ludwig 0.18.0 (known: 0.17.10)")
    assert f"{ESCAPE}=1" in lines[0]
    escaped = subprocess.run([sys.executable, "-m", "ludwig_mt.patches"], capture_output=True, text=True, timeout=120,
                             env={**env, ESCAPE: "1"}, cwd=REPO)
    assert escaped.returncode == 0 and escaped.stderr.startswith("warning: untested versions: ludwig 0.18.0")
