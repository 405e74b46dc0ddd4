"""THE registry: every attribute of Ludwig (and of transformers, peft, accelerate as Ludwig uses them) that the
project replaces, one row per patch, in the order the patches are applied.

Every workaround lives here: a patch not in :data:`PATCHES` cannot replace anything (:func:`core.rebind` refuses a
target its patch does not declare), and a test fails on any attribute of a third-party module assigned anywhere
else in the project. ``python -m ludwig_mt.patches`` prints the table (the README's table is that output) and
checks the installed versions against the ones the patches were written for.

Order: a later patch of the same attribute wraps the earlier one, so the table's order is the stacking order
(:func:`stacking`; e.g. ``Trainer.train_step``: ``bf16_autocast`` inside ``write_rank_report`` inside
``record_step_losses``). Switches read the environment when the patches are applied, the same way in every
process: the plain ``ludwig`` command (import hook), the launcher's workers, the benchmarks.
"""

from __future__ import annotations

from collections.abc import Collection

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches import distributed, fixes, instrumentation, lean_evaluation, speedups, varlen_attention
from ludwig_mt.patches.core import ALWAYS, EXPLICIT, KNOWN_VERSIONS, Patch, Switch, apply_patch, env_set
from ludwig_mt.patches.env import ENV_ALLOW_UNTESTED, ENV_NO_FIXES, ENV_PATCHES_OFF, env_flag, env_names
from ludwig_mt.patches.instrumentation import ENV_CRASH_AFTER_CHECKPOINT, ENV_PROGRESS_FILE, ENV_RANK_REPORT
from ludwig_mt.patches.model_loading import TARGET as MODEL_LOADER
from ludwig_mt.strategies import ENV_STRATEGY, SHARDED_WEIGHT_STRATEGIES, is_distributed_launch, strategy_name

TRAINER = "ludwig.trainers.trainer:Trainer"
LLM = "ludwig.models.llm:LLM"
LUDWIG_MODEL = "ludwig.api:LudwigModel"

SPEEDUP = Switch("always; off at use time: `LUDWIG_MT_SPEEDUPS=0`, or its name in `LUDWIG_MT_SPEEDUPS_OFF`",
                 lambda: True)
UNDER_LAUNCHER = Switch(f"`{ENV_STRATEGY}` set (by `ludwig_mt.launch`) or `WORLD_SIZE` > 1", is_distributed_launch)
SHARDED_WEIGHTS = Switch(f"`{ENV_STRATEGY}=zero3` or `fsdp`", lambda: strategy_name() in SHARDED_WEIGHT_STRATEGIES)


def _fix(name: str, targets: tuple[str, ...], purpose: str, body, packages: tuple[str, ...] = ("ludwig",)) -> Patch:
    return Patch(name, targets, purpose, "fix", ALWAYS, body, packages)


def _speedup(name: str, targets: tuple[str, ...], purpose: str, body, packages: tuple[str, ...]) -> Patch:
    return Patch(name, targets, purpose, "speed-up", SPEEDUP, body, packages)


PATCHES: tuple[Patch, ...] = (
    # ------------------------------------------------------------------------------ correctness fixes (fixes.py)
    _fix("allow_null_adapters_schema",
         ("ludwig.schema.llms.peft:NamedAdaptersConfigField._jsonschema_type_mapping",
          "ludwig.schema.llms.peft:MergeAdaptersConfigField._jsonschema_type_mapping"),
         "`ludwig predict` / `LudwigModel.load` fail on every LLM model (`adapters: null`): the schema accepts null",
         fixes.allow_null_adapters_schema),
    _fix("keep_text_fill_value_when_tokenizer_has_no_unk",
         ("ludwig.features.text_feature:TextFeatureMixin.feature_data",),
         "`ludwig predict` fails (`fill_with_const`) when the tokenizer has no unknown token: the fill value is kept",
         fixes.keep_text_fill_value_when_tokenizer_has_no_unk),
    _fix("refuse_quantized_training_without_cuda",
         (f"{LUDWIG_MODEL}.train", f"{LUDWIG_MODEL}.experiment"),
         "4-bit training without CUDA crashes after training: refused before any work, with one line",
         fixes.refuse_quantized_training_without_cuda, ("ludwig", "torch")),
    _fix("build_bitsandbytes_optimizers_without_removed_arguments",
         ("ludwig.modules.optimization_modules:get_optimizer_class_and_kwargs",),
         "every bitsandbytes optimizer fails to build (`block_wise`): the removed arguments are not passed",
         fixes.build_bitsandbytes_optimizers_without_removed_arguments, ("ludwig", "bitsandbytes")),
    _fix("stop_responses_at_eos",
         (f"{LLM}.generate",),
         "responses that stop early get id-0 padding decoded (`!!!!`): tokens after the first EOS become EOS",
         fixes.stop_responses_at_eos, ("ludwig", "transformers")),
    _fix("reload_checkpoints_of_4bit_models",
         (f"{LLM}.load_state_dict",),
         "every 4-bit run crashes at the best-checkpoint reload (`absmax`...): the frozen 4-bit state is left out",
         fixes.reload_checkpoints_of_4bit_models, ("ludwig", "bitsandbytes")),
    _fix("unpacked_forward_instead_of_broken_packing",
         (f"{LLM}.forward",),
         "`trainer.packing: true` crashes (3-D mask) and misaligns targets: steps off the lean path train unpacked",
         fixes.unpacked_forward_instead_of_broken_packing, ("ludwig", "transformers")),
    _fix("resume_mid_epoch_where_it_stopped",
         (f"{TRAINER}._create_or_resume_progress_tracker", f"{TRAINER}._train_loop", f"{TRAINER}.save_checkpoint"),
         "a resumed run restarts the LR schedule, the killed epoch and the random generators (dropout): all continue "
         "from the checkpoint, on a resumed run only",
         fixes.resume_mid_epoch_where_it_stopped, ("ludwig", "torch")),
    _fix("defer_ctrl_c_during_checkpoint_saves",
         ("ludwig.utils.checkpoint_utils:signal",),
         "a Ctrl-C during a checkpoint save is dropped (Ludwig ignores SIGINT there): it is held and delivered after it",
         fixes.defer_ctrl_c_during_checkpoint_saves),
    _fix("cut_prompts_from_the_instruction_side",
         ("ludwig.utils.strings_utils:_get_sequence_vector",
          "ludwig.features.text_feature:TextFeatureMixin.add_feature_data"),
         "an over-long prompt loses its end (input and answer cue): its start is cut instead, a leading BOS kept, "
         "in training and `ludwig predict` alike",
         fixes.cut_prompts_from_the_instruction_side),
    _fix("train_eos_row_when_frozen_dead",
         (f"{LLM}.initialize_adapter", "ludwig.schema.llms.peft:LoraConfig.to_config"),
         "LoRA cannot teach a model to stop when its EOS output row was never trained (stories260k: best P(EOS) "
         "0.005, every answer runs to max_new_tokens): that one embedding row is trained with the adapter",
         fixes.train_eos_row_when_frozen_dead, ("ludwig", "peft", "torch")),
    _fix("pad_merged_rows_with_the_pad_token",
         ("ludwig.utils.llm_utils:generate_merged_ids", "ludwig.models.llm:generate_merged_ids"),
         "training rows attend to their id-0 left padding when the pad token is not id 0 (SmolLM2, Qwen): padded "
         "with the pad token, masked by position",
         fixes.pad_merged_rows_with_the_pad_token, ("ludwig", "torch")),
    _fix("stop_on_nan_on_every_rank_with_its_cause",
         (f"{TRAINER}._has_nan_or_inf_weights", f"{TRAINER}._eval_and_checkpoint"),
         "a run that diverges before its first evaluation dies in the training report (`min() iterable argument is "
         "empty`) or on rank 0 alone: every rank stops together, with one line naming the step and the fix",
         fixes.stop_on_nan_on_every_rank_with_its_cause, ("ludwig", "torch")),
    _fix("release_each_steps_graph_when_it_returns",
         (f"{TRAINER}.train_step",),
         "the training loop keeps each step's loss, and with it the step's autograd graph (the attention mask, "
         "rotary tables and inputs that reentrant checkpointing holds), alive through the next step: the losses "
         "come back detached",
         fixes.release_each_steps_graph_when_it_returns, ("ludwig", "torch")),
    _fix("keep_the_base_frozen_under_8bit_optimizers",
         (fixes.EMBEDDING_SWAP,),
         "with an 8-bit optimizer Ludwig swaps in bitsandbytes' embedding as a new trainable parameter: a LoRA run "
         "trains the base model's embedding (and a tied LM head), which the saved adapter lacks; it stays frozen",
         fixes.keep_the_base_frozen_under_8bit_optimizers, ("ludwig", "torch")),
    _fix("one_line_errors_in_cli",
         ("ludwig.cli:main",),
         "the `ludwig` command prints the project's errors as one line (exit 2), not a traceback; `ludwig train`/"
         "`experiment` refuse YAML keys Ludwig would ignore (`trainer.epochz`)",
         fixes.one_line_errors_in_cli),
    # ------------------------------------------------------------------------------------- speed-ups (speedups.py)
    _speedup("bf16_weights", (MODEL_LOADER,),
             "without quantization Ludwig loads the base model in fp32: bf16 on a CUDA GPU with bf16",
             speedups.patch_bf16_weights, ("ludwig", "transformers", "torch")),
    _speedup("sdpa_attention", (MODEL_LOADER,),
             "with bitsandbytes Ludwig forces eager attention: transformers' default (SDPA) instead",
             speedups.patch_sdpa_attention, ("ludwig", "transformers")),
    _speedup("liger_kernels", (MODEL_LOADER,),
             "Liger's fused RMSNorm/SwiGLU/RoPE kernels on CUDA when liger-kernel is installed",
             speedups.patch_liger_kernels, ("ludwig", "transformers")),
    _speedup("varlen_attention", (MODEL_LOADER,),
             "packs pad each step to a rectangle and need a block mask, with which SDPA copies the key/value heads "
             f"for grouped-query attention: on a CUDA GPU (or with `{speedups.ENV_PACK_LENGTH}=varlen`) the loaded "
             f"model attends with `{varlen_attention.NAME}` (SDPA, or PyTorch's variable-length flash kernel for "
             "padding-free steps; same loss, bf16 LoRA 8.78 GiB instead of 10.94 on SmolLM2, run 28)",
             speedups.patch_varlen_attention, ("transformers", "torch")),
    _speedup("lean_kbit_prep", (f"{LLM}.prepare_for_quantized_training",),
             "peft's k-bit preparation casts the embedding and LM head to fp32: the loaded dtypes are kept",
             speedups.patch_lean_kbit_prep, ("ludwig", "peft")),
    _speedup("target_only_logits",
             (f"{TRAINER}._forward_pass", f"{LLM}.forward", f"{LLM}.train_loss", f"{TRAINER}._update_training_metrics"),
             "training computes the LM head and loss on response tokens only (same loss), and packs correctly",
             speedups.patch_target_only_logits, ("ludwig", "transformers", "torch")),
    _speedup("pack_training_rows", (f"{LLM}.forward",),
             "Ludwig left-pads each batch to its longest row: rows packed into sequences that long rounded up to a "
             "power of two (position ids restart per row; same loss)",
             speedups.patch_pack_training_rows, ("ludwig", "transformers")),
    _speedup("response_only_eval_logits", lean_evaluation.TARGETS,
             "the evaluation in `ludwig train` kept float32 logits and probabilities of every position over the whole "
             "vocabulary (3.25 GiB for 8 rows of SmolLM2, 3.9x a training step): the positions its loss and "
             "perplexities read only (same metrics)",
             speedups.patch_response_only_eval_logits, ("ludwig", "transformers", "torch")),
    _speedup("sampled_train_metrics", (f"{TRAINER}._update_training_metrics",),
             "training-set metrics over the full logits after every step: on one step in 8",
             speedups.patch_sampled_train_metrics, ("ludwig",)),
    _speedup("realign_without_copies", (speedups.REALIGN,),
             "Ludwig deep-copies the float32 logits and probabilities over the vocabulary to align them with the "
             "targets for its metrics (0.27 GiB of a SmolLM2 QLoRA run's 0.57 at its peak): new dicts, the same "
             "padded tensors",
             speedups.patch_realign_without_copies, ("ludwig", "torch")),
    _speedup("bf16_autocast", (f"{TRAINER}.train_step", f"{TRAINER}._forward_pass"),
             "peft runs the LoRA math in fp32 next to bf16 matmuls: bf16 autocast on CUDA, fp32 weights kept",
             speedups.patch_bf16_autocast, ("ludwig", "peft", "torch")),
    _speedup("lean_lora_forward", speedups.LORA_LAYER_FORWARDS,
             "peft runs each LoRA layer as 5 modules, copying the 4-bit output and each adapter's dropped input: one "
             "autograd node in training",
             speedups.patch_lean_lora_forward, ("peft", "bitsandbytes", "torch")),
    _speedup("fused_lora_mlp", (MODEL_LOADER,),
             "a LoRA-adapted Llama-style MLP runs as 7 modules and keeps silu(gate)*up for the backward: one "
             "autograd node that recomputes it",
             speedups.patch_fused_lora_mlp, ("peft", "bitsandbytes", "torch", "transformers")),
    _speedup("one_sync_optimizer_step", (speedups.BNB_OPTIMIZER_STEP,),
             "bitsandbytes' optimizers synchronise with the GPU after every parameter's update: once per step",
             speedups.patch_one_sync_optimizer_step, ("bitsandbytes", "torch")),
    _speedup("offload_checkpoints", (speedups.CHECKPOINTING_ENABLE,),
             "gradient checkpointing keeps every layer's input on the GPU: in pinned host memory, copied on a side "
             "stream (0.77 GiB less for the 1B shape at 1 % of its speed)",
             speedups.patch_offload_checkpoints, ("transformers", "torch")),
    # -------------------------------------------------------- instrumentation and drills (instrumentation.py)
    Patch("write_training_progress",
          (f"{TRAINER}._train_loop", f"{TRAINER}.train_step", f"{TRAINER}.save_checkpoint"),
          "rank 0 appends a JSON line per step (step, total, loss) and per checkpoint: `./run.sh train`'s progress bar",
          "instrumentation", env_set(ENV_PROGRESS_FILE, "FILE"), instrumentation.write_training_progress),
    Patch("crash_drill_after_checkpoint", (f"{TRAINER}.save_checkpoint",),
          "kills the process right after its N-th checkpoint: the resume tests' crash drill", "instrumentation",
          env_set(ENV_CRASH_AFTER_CHECKPOINT, "N"), instrumentation.crash_drill_after_checkpoint),
    Patch("write_rank_report", (f"{TRAINER}.train_step", f"{TRAINER}._train_loop", f"{TRAINER}.train"),
          "each rank writes its rows, losses, tokens, peak memory and final weights: evidence for tests and GPU runs",
          "instrumentation", env_set(ENV_RANK_REPORT, "DIR"), instrumentation.write_rank_report,
          ("ludwig", "torch")),
    # ------------------------------------------------------------------------------ distributed (distributed.py)
    Patch("start_accelerate_strategy_under_launcher",
          ("ludwig.backend.base:LocalTrainingMixin.initialize", "ludwig.backend.base:LocalTrainingMixin.is_coordinator",
           "ludwig.backend.base:LocalBackend.create_trainer"),
          "Ludwig never starts its accelerate strategy: each worker does, shards the rows, only rank 0 writes",
          "distributed", UNDER_LAUNCHER, distributed.start_accelerate_strategy_under_launcher,
          ("ludwig", "accelerate", "deepspeed", "torch")),
    Patch("accept_declared_backend_section", ("ludwig.backend:create_backend", f"{LUDWIG_MODEL}.train"),
          "a YAML's `backend.trainer` (processes, DeepSpeed/DDP/FSDP) makes `LocalBackend` fail: it is the launcher's; "
          "a plain run checks it and says how to launch the declared processes",
          "distributed", ALWAYS, distributed.accept_declared_backend_section),
    Patch("refuse_incompatible_strategy", (f"{LUDWIG_MODEL}.train",),
          "ZeRO-3/FSDP with 4-bit weights cannot work: refused at `LudwigModel.train` with one line (bare torchrun)",
          "distributed", UNDER_LAUNCHER, distributed.refuse_incompatible_strategy),
    Patch("place_quantized_model_on_local_rank", (MODEL_LOADER,),
          "`device_map=\"auto\"` spreads every rank's 4-bit copy over all GPUs: each rank loads on its own GPU",
          "distributed", UNDER_LAUNCHER, distributed.place_quantized_model_on_local_rank, ("ludwig", "transformers")),
    Patch("gather_weights_after_sharded_training", (f"{TRAINER}.train", f"{LLM}.save"),
          "ZeRO-3/FSDP shard the weights Ludwig reloads and saves on rank 0: they are gathered on every rank",
          "distributed", SHARDED_WEIGHTS, distributed.gather_weights_after_sharded_training,
          ("ludwig", "deepspeed", "torch")),
    # ------------------------------------------------------------------------ applied by name only (benchmarks)
    Patch("record_step_losses", (f"{TRAINER}.train_step",),
          "keeps every training step's loss in the process: bench/train_speed.py's loss check",
          "instrumentation", EXPLICIT, instrumentation.record_step_losses),
)
BY_NAME: dict[str, Patch] = {patch.name: patch for patch in PATCHES}
#: applied while ``ludwig.cli`` loads (before ``ludwig.cli.main`` runs), the rest when ``ludwig.api`` loads
CLI_PATCHES: tuple[str, ...] = tuple(p.name for p in PATCHES if all(t.startswith("ludwig.cli:") for t in p.targets))


def get(name: str) -> Patch:
    """The patch called ``name``; a one-line error listing the names otherwise."""
    if name not in BY_NAME:
        raise WorkflowError(f"{name}: no such patch. Fix: use a name from python -m ludwig_mt.patches "
                            f"({', '.join(BY_NAME)})")
    return BY_NAME[name]


def raw_ludwig() -> bool:
    """``LUDWIG_MT_NO_FIXES=1``: no patch at all in this process (raw Ludwig, to show what each one fixes)."""
    return env_flag(ENV_NO_FIXES)


def patches_off() -> set[str]:
    """The names in ``LUDWIG_MT_PATCHES_OFF``; an unknown name is an error, so a typo never leaves a patch on."""
    names = env_names(ENV_PATCHES_OFF)
    for name in sorted(names):
        get(name)
    return names


def apply(name: str) -> bool:
    """Apply the patch ``name`` now, whatever its switch (tests, and the benchmark's explicit patch); once per
    process. True if it was applied by this call."""
    return apply_patch(get(name))


def apply_all(names: Collection[str] | None = None) -> list[str]:
    """Apply, in table order, every patch whose switch is on (only those in ``names`` when given), unless
    ``LUDWIG_MT_NO_FIXES=1`` or named in ``LUDWIG_MT_PATCHES_OFF``; once per process, safe to call many times.
    Checks the installed versions first (:func:`core.guard_versions`). Returns the names applied by this call."""
    if raw_ludwig():
        return []
    off = patches_off()
    wanted = [p for p in PATCHES if (names is None or p.name in names) and p.name not in off]
    return [p.name for p in wanted if p.switch.on() and apply_patch(p)]


def stacking(patches: tuple[Patch, ...] = PATCHES) -> dict[str, list[str]]:
    """target -> the patches that replace it, innermost first, for every target replaced more than once: the order
    the table (and so :func:`apply_all`) gives them."""
    order: dict[str, list[str]] = {}
    for patch in patches:
        for target in patch.targets:
            order.setdefault(target, []).append(patch.name)
    return {target: names for target, names in order.items() if len(names) > 1}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(patches: tuple[Patch, ...] = PATCHES) -> str:
    """The registry as the Markdown the README shows: how the switches work, then one row per patch."""
    known = "; ".join(f"{p} {', '.join(v)}" for p, v in KNOWN_VERSIONS.items())
    lines = [
        "Applied in this order whenever `ludwig.cli` or `ludwig.api` is imported (a later patch of the same attribute "
        "wraps the earlier one), in every process alike: the plain `ludwig` command, the launcher's workers, the "
        "benchmarks.",
        f"`{ENV_NO_FIXES}=1` applies none (raw Ludwig); `{ENV_PATCHES_OFF}=name,...` leaves the named ones out; "
        f"on an installed version outside the known set ({known}; a two-part version means any patch release) the "
        f"project stops with one line unless `{ENV_ALLOW_UNTESTED}=1`.",
        "",
        "| name | target | kind | switch | versions | purpose |",
        "|---|---|---|---|---|---|",
    ]
    for p in patches:
        targets = "<br>".join(f"`{t}`" for t in p.targets)
        lines.append(f"| `{p.name}` | {targets} | {p.kind} | {_cell(p.switch.text)} | {p.versions} | "
                     f"{_cell(p.purpose)} |")
    return "\n".join(lines) + "\n"
