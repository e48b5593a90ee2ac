"""``flask artifacts demo``: write a small, realistic Trainer job to try the routes on.

Weights are real safetensors files, written here without numpy or
safetensors (the format is an 8-byte header length, a JSON header, then the
raw little-endian tensors), so the command works on a bare install.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path


def _noise(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], seed: str) -> None:
    """Write float32/float16 tensors of the given shapes with deterministic values."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, (dtype, shape) in sorted(tensors.items()):
        count = 1
        for dim in shape:
            count *= dim
        if dtype == "F32":
            data = struct.pack(f"<{count}f", *((b - 128) / 1024 for b in _noise(seed + name, count)))
        else:
            data = struct.pack(f"<{count}e", *((b - 128) / 1024 for b in _noise(seed + name, count)))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_demo_job(logs_dir: str | os.PathLike[str], job_id: str = "demo",
                   checkpoints: tuple[int, ...] = (50, 100)) -> Path:
    """Write ``logs_dir/job_<id>/`` (final model, checkpoints), its log and progress."""
    logs = Path(logs_dir)
    root = logs / f"job_{job_id}"
    root.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": ("F32", (256, 64)),
        "model.layers.0.self_attn.q_proj.weight": ("F16", (64, 64)),
        "model.layers.0.mlp.up_proj.weight": ("F32", (64, 128)),
        "lm_head.weight": ("F32", (256, 64)),
    }
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "vocab_size": 256, "torch_dtype": "float32", "transformers_version": "4.46.3"}
    tokenizer = {"version": "1.0", "added_tokens": [{"id": 0, "content": "<|endoftext|>",
                 "special": True}], "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0},
                 "merges": []}}
    log_lines = []
    for step in checkpoints:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(folder / "model.safetensors", tensors, f"{job_id}-{step}")
        (folder / "optimizer.pt").write_bytes(_noise(f"opt-{step}", 2 * 160_000))
        (folder / "scheduler.pt").write_bytes(_noise(f"sched-{step}", 1064))
        (folder / "rng_state.pth").write_bytes(_noise(f"rng-{step}", 14_000))
        (folder / "training_args.bin").write_bytes(_noise("args", 5_304))
        (folder / "trainer_state.json").write_text(json.dumps({
            "global_step": step, "epoch": step / checkpoints[-1] * 3,
            "best_model_checkpoint": None, "best_metric": None,
            "log_history": [{"step": s, "loss": round(2.5 / (1 + s / 40), 4),
                             "learning_rate": 5e-5 * (1 - s / (checkpoints[-1] + 1))}
                            for s in range(10, step + 1, 10)],
        }, indent=2))
    for s in range(10, checkpoints[-1] + 1, 10):
        log_lines.append(f"step {s}: loss={2.5 / (1 + s / 40):.4f}")
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps({"max_new_tokens": 64}, indent=2))
    write_safetensors(root / "model.safetensors", tensors, f"{job_id}-final")
    (root / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}, indent=2))
    (root / "training_args.bin").write_bytes(_noise("args", 5_304))
    (root / "progress.json").write_text(json.dumps({"status": "completed", "job_id": job_id,
                                                    "current_step": checkpoints[-1],
                                                    "total_steps": checkpoints[-1]}))
    (logs / f"job_{job_id}.log").write_text("\n".join(log_lines + ["training completed"]) + "\n")
    return root
