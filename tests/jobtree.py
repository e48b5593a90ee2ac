"""Write the directory a Hugging Face Trainer leaves behind, for tests.

Everything is deterministic: the same arguments give the same bytes, so
tests can compare downloads against :func:`files_under` and the example
job in ``examples/`` regenerates without a diff. Weights are real
safetensors files; the files that only PyTorch can write (``*.pt``,
``*.pth``, ``*.bin``) are pseudo-random bytes of a realistic size.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import typing as t
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

__all__ = ["make_job", "sparse_file", "files_under"]

_TRANSFORMERS_VERSION = "4.46.3"
_STARTED = datetime.datetime(2024, 5, 1, 9, 0, 0)
_SECONDS_PER_STEP = 1.7
_MICRO_BATCHES = 8
_LOGGING_STEPS = 5
_LEARNING_RATE = 5e-5
_EPOCHS = 3

# One decoder layer of a tiny Llama. Mixed dtypes so archives hold both.
_TENSORS: tuple[tuple[str, type[np.floating[t.Any]]], ...] = (
    ("model.embed_tokens.weight", np.float32),
    ("model.layers.0.self_attn.q_proj.weight", np.float16),
    ("model.layers.0.self_attn.k_proj.weight", np.float16),
    ("model.layers.0.self_attn.v_proj.weight", np.float16),
    ("model.layers.0.self_attn.o_proj.weight", np.float16),
    ("model.layers.0.mlp.up_proj.weight", np.float32),
    ("model.layers.0.mlp.down_proj.weight", np.float32),
    ("lm_head.weight", np.float32),
)

_SPECIAL = "<|endoftext|>"
_MERGES = ("Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "Ġ a")


def make_job(
    logs_dir: str | os.PathLike[str],
    job_id: str = "abc123",
    *,
    status: str = "completed",
    checkpoints: t.Iterable[int] = (10, 20),
    sharded: bool = False,
    shape: tuple[int, ...] = (32, 16),
    log: str | None = "root",
    progress: str | None = "inside",
    best_checkpoint: int | None = None,
    tokenizer: bool = True,
    extra_files: t.Mapping[str, bytes | str] | None = None,
    final_model: bool | None = None,
) -> Path:
    """Write ``LOGS_DIR/job_<id>/`` as a Trainer run would and return it.

    :param logs_dir: The directory the server is configured to serve.
    :param job_id: The job's id; also seeds every generated value.
    :param status: Goes into ``progress.json``; anything but
        ``"completed"`` makes the run stop short of its last step, and
        ``"failed"`` ends the log with a traceback.
    :param checkpoints: Steps that have a ``checkpoint-<step>/`` folder.
    :param sharded: Save weights (final and checkpoints) as two shards
        with ``model.safetensors.index.json``, as ``save_pretrained``
        does past ``max_shard_size``.
    :param shape: The shape of every weight tensor.
    :param log: ``"root"`` for ``LOGS_DIR/job_<id>.log``, ``"inside"``
        for ``job_<id>/job_<id>.log``, ``None`` for no log.
    :param progress: ``"inside"`` for ``job_<id>/progress.json``,
        ``"root"`` for ``LOGS_DIR/job_<id>_progress.json``, ``None`` for
        none.
    :param best_checkpoint: Step recorded as ``best_model_checkpoint``
        in every ``trainer_state.json``; also adds eval entries.
    :param tokenizer: Write ``tokenizer.json``,
        ``tokenizer_config.json`` and ``special_tokens_map.json`` (in
        the job and in each checkpoint, as the Trainer does when it has
        a tokenizer).
    :param extra_files: Relative path to content, written last under
        the job directory (``str`` is encoded as UTF-8).
    :param final_model: Write the final model (weights, configs,
        tokenizer, ``training_args.bin``) at the top of the job, as
        ``trainer.save_model()`` does when training ends. Defaults to
        ``status == "completed"``: a running or failed job has only
        checkpoints.
    """
    if log not in ("root", "inside", None):
        raise ValueError(f"log must be 'root', 'inside' or None, not {log!r}.")

    if progress not in ("root", "inside", None):
        raise ValueError(
            f"progress must be 'root', 'inside' or None, not {progress!r}."
        )

    logs = Path(logs_dir)
    job_dir = logs / f"job_{job_id}"
    job_dir.mkdir(parents=True, exist_ok=True)
    steps = sorted(set(checkpoints))
    run = _Run(job_id, status, steps, best_checkpoint)
    best_path = None

    if best_checkpoint is not None:
        best_path = str(job_dir / f"checkpoint-{best_checkpoint}")

    if final_model is None:
        final_model = status == "completed"

    if final_model:
        _write_model(job_dir, job_id, "final", shape, sharded, tokenizer)
        _write_bytes(job_dir / "training_args.bin", _noise(job_id, "args", 5_368))

    for step in steps:
        ckpt = job_dir / f"checkpoint-{step}"
        ckpt.mkdir(exist_ok=True)
        weights = _write_model(ckpt, job_id, str(step), shape, sharded, tokenizer)
        # Adam keeps two fp32 moments per parameter.
        _write_bytes(ckpt / "optimizer.pt", _noise(job_id, f"opt{step}", 2 * weights))
        _write_bytes(ckpt / "scheduler.pt", _noise(job_id, f"sched{step}", 1_064))
        _write_bytes(ckpt / "rng_state.pth", _noise(job_id, f"rng{step}", 14_244))
        _write_bytes(ckpt / "training_args.bin", _noise(job_id, "args", 5_368))
        _write_json(ckpt / "trainer_state.json", run.trainer_state(step, best_path))

    if log == "root":
        _write_text(logs / f"job_{job_id}.log", run.log_text())
    elif log == "inside":
        _write_text(job_dir / f"job_{job_id}.log", run.log_text())

    state = {
        "status": status,
        "job_id": job_id,
        "current_step": run.current_step,
        "total_steps": run.total_steps,
        "loss": round(run.loss(run.current_step), 4),
    }

    if progress == "inside":
        _write_json(job_dir / "progress.json", state)
    elif progress == "root":
        _write_json(logs / f"job_{job_id}_progress.json", state)

    for rel, content in (extra_files or {}).items():
        data = content.encode() if isinstance(content, str) else content
        _write_bytes(job_dir / rel, data)

    return job_dir


def sparse_file(path: str | os.PathLike[str], size: int) -> Path:
    """Create a file of ``size`` zero bytes that takes no disk space.

    For tests of huge members (ZIP64, sizes past 4 GiB) on a small disk.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch()
    os.truncate(p, size)
    return p


def files_under(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Map each file's path relative to ``root`` (POSIX form) to its bytes."""
    base = Path(root)
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


class _Run:
    """The numbers one training run reports, derived from its arguments."""

    def __init__(
        self, job_id: str, status: str, steps: list[int], best: int | None
    ) -> None:
        self.job_id = job_id
        self.status = status
        self.steps = steps
        self.best = best
        self.save_steps = steps[0] if steps else 500
        last = steps[-1] if steps else 0

        if status == "completed":
            self.total_steps = last or 20
            self.current_step = self.total_steps
        else:
            # Stopped (or still going) a few steps past its last checkpoint.
            self.total_steps = 2 * (last or 10)
            self.current_step = max(min(last + 3, self.total_steps - 1), last)

        self._rng = np.random.default_rng(_seed(job_id, "loss"))
        self._noise = self._rng.normal(0, 0.03, self.total_steps + 4)

    def loss(self, step: int) -> float:
        return 0.62 + 2.1 * math.exp(-step / 12) + float(self._noise[step])

    def eval_loss(self, step: int) -> float:
        # Lowest at the best checkpoint, so the state is self-consistent.
        assert self.best is not None
        return 0.9 + 0.004 * abs(step - self.best)

    def lr(self, step: int) -> float:
        return _LEARNING_RATE * (1 - step / self.total_steps)

    def grad_norm(self, step: int) -> float:
        return 0.4 + 3.0 * math.exp(-step / 6) + abs(float(self._noise[step])) * 10

    def epoch(self, step: int) -> float:
        return round(step * _EPOCHS / self.total_steps, 4)

    def time(self, step: float) -> str:
        when = _STARTED + datetime.timedelta(seconds=30 + step * _SECONDS_PER_STEP)
        return when.strftime("%Y-%m-%d %H:%M:%S,") + f"{when.microsecond // 1000:03d}"

    def trainer_state(self, step: int, best_path: str | None) -> dict[str, t.Any]:
        history: list[dict[str, t.Any]] = []

        for s in range(1, step + 1):
            if s % _LOGGING_STEPS == 0:
                history.append(
                    {
                        "epoch": self.epoch(s),
                        "grad_norm": round(self.grad_norm(s), 6),
                        "learning_rate": self.lr(s),
                        "loss": round(self.loss(s), 4),
                        "step": s,
                    }
                )

            if self.best is not None and s in self.steps:
                history.append(
                    {
                        "epoch": self.epoch(s),
                        "eval_loss": self.eval_loss(s),
                        "eval_runtime": 1.2345,
                        "eval_samples_per_second": 81.0,
                        "eval_steps_per_second": 10.125,
                        "step": s,
                    }
                )

        return {
            "best_metric": self.eval_loss(self.best) if self.best is not None else None,
            "best_model_checkpoint": best_path,
            "epoch": self.epoch(step),
            "eval_steps": self.save_steps,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": history,
            "logging_steps": _LOGGING_STEPS,
            "max_steps": self.total_steps,
            "num_input_tokens_seen": 0,
            "num_train_epochs": _EPOCHS,
            "save_steps": self.save_steps,
            "stateful_callbacks": {
                "TrainerControl": {
                    "args": {
                        "should_epoch_stop": False,
                        "should_evaluate": False,
                        "should_log": False,
                        "should_save": True,
                        "should_training_stop": step == self.total_steps,
                    },
                    "attributes": {},
                }
            },
            "total_flos": float(step * 1_523_712),
            "train_batch_size": 8,
            "trial_name": None,
            "trial_params": None,
        }

    def log_text(self) -> str:
        out = f"job_{self.job_id}"
        t0 = self.time(-17)
        lines = [
            f"{t0} - INFO - __main__ - Starting job {self.job_id}",
            f"{t0} - INFO - __main__ - Training/evaluation parameters "
            "TrainingArguments(",
        ]
        args = {
            "output_dir": out,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": _MICRO_BATCHES,
            "learning_rate": _LEARNING_RATE,
            "lr_scheduler_type": "linear",
            "max_steps": self.total_steps,
            "num_train_epochs": _EPOCHS,
            "logging_steps": _LOGGING_STEPS,
            "save_strategy": "steps",
            "save_total_limit": None,
            "seed": 42,
            "fp16": False,
            "bf16": False,
            "report_to": [],
        }
        lines += [f"{k}={v!r}," for k, v in args.items()]
        lines.append(")")
        hf = f"{self.time(-9)} - INFO - transformers.trainer -"
        lines += [
            f"{hf} ***** Running training *****",
            f"{hf}   Num examples = 1,920",
            f"{hf}   Num Epochs = {_EPOCHS}",
            f"{hf}   Total optimization steps = {self.total_steps:,}",
        ]

        for step in range(1, self.current_step + 1):
            for micro in range(1, _MICRO_BATCHES + 1):
                when = self.time(step - 1 + micro / _MICRO_BATCHES)
                loss = self.loss(step) + 0.01 * (micro - _MICRO_BATCHES / 2)
                lines.append(
                    f"{when} - DEBUG - trainer.loop - step {step}/{self.total_steps}"
                    f" micro-batch {micro}/{_MICRO_BATCHES} loss={loss:.4f}"
                    f" tokens/s={31_000 + 37 * micro + step}"
                )

            lines.append(
                f"{self.time(step)} - INFO - trainer.loop - step {step}/"
                f"{self.total_steps} loss={self.loss(step):.4f}"
                f" lr={self.lr(step):.3e} grad_norm={self.grad_norm(step):.4f}"
            )

            if step % _LOGGING_STEPS == 0:
                lines.append(
                    f"{{'loss': {self.loss(step):.4f}, 'grad_norm': "
                    f"{self.grad_norm(step):.6f}, 'learning_rate': "
                    f"{self.lr(step)!r}, 'epoch': {self.epoch(step)!r}}}"
                )

            if self.best is not None and step in self.steps:
                eval_loss = self.eval_loss(step)
                lines.append(f"{{'eval_loss': {eval_loss!r}, 'step': {step}}}")

            if step in self.steps:
                lines.append(
                    f"{self.time(step)} - INFO - transformers.trainer - "
                    f"Saving model checkpoint to {out}/checkpoint-{step}"
                )

        if self.status == "completed":
            end = self.time(self.current_step + 1)
            lines += [
                f"{end} - INFO - transformers.trainer - Training completed.",
                f"{end} - INFO - transformers.trainer - "
                f"Saving model checkpoint to {out}",
                f"{end} - INFO - __main__ - Job {self.job_id} finished",
            ]
        elif self.status == "failed":
            end = self.time(self.current_step + 1)
            lines += [
                f"{end} - ERROR - __main__ - Job {self.job_id} failed",
                "Traceback (most recent call last):",
                '  File "train.py", line 211, in <module>',
                "    trainer.train()",
                "RuntimeError: CUDA error: out of memory",
            ]

        return "\n".join(lines) + "\n"


def _write_model(
    dest: Path,
    job_id: str,
    tag: str,
    shape: tuple[int, ...],
    sharded: bool,
    tokenizer: bool,
) -> int:
    """Write what ``save_pretrained`` writes; return the weights' fp32 size."""
    rng = np.random.default_rng(_seed(job_id, "weights", tag))
    tensors = {
        name: rng.normal(0, 0.02, shape).astype(dtype) for name, dtype in _TENSORS
    }
    _write_json(dest / "config.json", _config(shape))
    _write_json(dest / "generation_config.json", _generation_config())
    meta = {"format": "pt"}

    if sharded:
        names = list(tensors)
        half = len(names) // 2
        shards = {
            "model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:],
        }
        weight_map = {}

        for file, part in shards.items():
            save_file({n: tensors[n] for n in part}, dest / file, metadata=meta)
            weight_map.update(dict.fromkeys(part, file))

        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(dest / "model.safetensors.index.json", index)
    else:
        save_file(tensors, dest / "model.safetensors", metadata=meta)

    if tokenizer:
        _write_json(dest / "tokenizer.json", _tokenizer_json(), sort_keys=False)
        _write_json(dest / "tokenizer_config.json", _tokenizer_config())
        _write_json(dest / "special_tokens_map.json", _special_tokens_map())

    return sum(a.size * 4 for a in tensors.values())


def _config(shape: tuple[int, ...]) -> dict[str, t.Any]:
    hidden = shape[-1]
    return {
        "_name_or_path": "tiny-llama",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": max(hidden // 2, 1),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": hidden * 4,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": shape[0],
    }


def _generation_config() -> dict[str, t.Any]:
    return {
        "_from_model_config": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "transformers_version": _TRANSFORMERS_VERSION,
    }


def _tokenizer_json() -> dict[str, t.Any]:
    """A byte-level BPE tokenizer in the ``tokenizers`` library's format."""
    vocab = {_SPECIAL: 0, "Ġ": 1}

    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)

    for merge in _MERGES:
        vocab["".join(merge.split())] = len(vocab)

    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 0,
                "content": _SPECIAL,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split() for m in _MERGES],
        },
    }


def _tokenizer_config() -> dict[str, t.Any]:
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "0": {
                "content": _SPECIAL,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
        "bos_token": _SPECIAL,
        "clean_up_tokenization_spaces": False,
        "eos_token": _SPECIAL,
        "model_max_length": 256,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": _SPECIAL,
    }


def _special_tokens_map() -> dict[str, t.Any]:
    token = {
        "content": _SPECIAL,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    return {"bos_token": token, "eos_token": token, "unk_token": token}


def _seed(*parts: str) -> int:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _noise(job_id: str, tag: str, size: int) -> bytes:
    # torch.save output can't be made without torch; random bytes have the
    # size and incompressibility that matter to an archive.
    return np.random.default_rng(_seed(job_id, tag)).bytes(size)


def _write_json(path: Path, data: t.Any, *, sort_keys: bool = True) -> None:
    # The same layout transformers uses for its JSON files.
    _write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode())


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
