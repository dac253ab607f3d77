"""Training throughput of the mmops trainer against the hand-tuned reference loop, in one run.

The reference (`../shared/bench/ref_train_loop.py`) trains a CLIP dual encoder; ours trains the
mmops model with late (CLIP-style) fusion and encoders of the same sizes, through the trainer's
own `train_step` with the same precision and compile modes and the same batch. A second part
feeds the same step from the real DataLoader over decoded PNG files, to show whether data loading
starves the GPU. Prints one JSON line:

    python bench/train_throughput.py                 # on a CUDA machine: size small, batch 256
    python bench/train_throughput.py --size tiny --batch 16 --steps 3 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from mmops.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from mmops.data.dataset import load_splits
from mmops.data.demo import make_demo_data
from mmops.model.classifier import MultimodalClassifier, build_encoders
from mmops.model.preprocess import Collator, MultimodalDataset, model_inputs, train_tokenizer
from mmops.training.loaders import make_loader
from mmops.training.runtime import Runtime
from mmops.training.steps import train_step

REF = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ref_train_loop.py"
# Encoder sizes of the reference's configs (ref_train_loop.make); "tiny" is for CPU smoke tests.
SIZES = {
    "small": dict(image=128, patch=16, width=384, layers=6, heads=6, ff=1536, vocab=30522),
    "b32": dict(image=224, patch=32, width=768, layers=12, heads=12, ff=3072, vocab=49408),
    "tiny": dict(image=64, patch=16, width=32, layers=1, heads=2, ff=64, vocab=1000),
}
SEQ = 32  # the reference's text length


def model_config(size: str) -> ModelConfig:
    s = SIZES[size]
    return ModelConfig(
        fusion="late",
        image_size=s["image"],
        # The reference's ViT has linear patch embeddings: the same here, not the conv stem.
        vision=VisionConfig(s["patch"], s["width"], s["layers"], s["heads"], s["ff"], stem="patch"),
        text=TextConfig(s["width"], s["layers"], s["heads"], s["ff"]),
        max_text_length=64,
        hidden_dim=512 if size == "b32" else 256,
        dropout=0.0,
    )


def ours(size: str, mode: str, batch: int, steps: int, device: torch.device) -> float:
    cfg = model_config(size)
    train_cfg = TrainConfig(contrastive_weight=1.0, augment="none", grad_clip=0.0)
    torch.manual_seed(0)
    vision, text = build_encoders(cfg, vocab_size=SIZES[size]["vocab"])
    model = MultimodalClassifier(cfg, 9, vision, text).to(device).train()
    runtime = Runtime(device, 0, 1, torch.bfloat16 if mode != "fp32" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if mode == "bf16+compile" else model
    inputs = {
        "pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device),
        "input_ids": torch.randint(0, SIZES[size]["vocab"], (batch, SEQ), device=device),
        "attention_mask": torch.ones(batch, SEQ, dtype=torch.long, device=device),
        "image_present": torch.ones(batch, dtype=torch.bool, device=device),
        "text_present": torch.ones(batch, dtype=torch.bool, device=device),
    }
    labels = torch.randint(0, 9, (batch,), device=device)
    return _timed(
        lambda: train_step(step_model, inputs, labels, optimizer, train_cfg, runtime),
        batch,
        steps,
        device,
    )


def ours_with_loader(
    size: str, mode: str, batch: int, steps: int, device: torch.device, workers: int
) -> dict[str, float]:
    """The same step fed by the real DataLoader over decoded PNGs of the model's image size."""
    cfg = model_config(size)
    root = Path(tempfile.mkdtemp(prefix="mmops-bench-")) / "data"
    make_demo_data(root, n=batch * (steps + 5), image_size=max(cfg.image_size, 32))
    from mmops.config import Params

    frame = load_splits(root, Params()).assign(split="train")
    tokenizer = train_tokenizer(frame["text"], 2000, cfg.max_text_length)
    labels = sorted(frame["label"].unique())
    dataset = MultimodalDataset(root, frame, {x: i for i, x in enumerate(labels)}, cfg.image_size)
    runtime = Runtime(device, 0, 1, torch.bfloat16 if mode != "fp32" else None)
    train_cfg = TrainConfig(num_workers=workers, batch_size=batch, augment="none")
    loader = make_loader(
        dataset, train_cfg, Collator(tokenizer, cfg.image_size, cfg.max_text_length), runtime, None
    )
    # Loader alone: how many decoded, collated examples per second it can supply.
    start = time.perf_counter()
    seen = sum(len(b["labels"]) for b in loader)
    loader_rate = seen / (time.perf_counter() - start)

    vision, text = build_encoders(cfg, vocab_size=len(tokenizer))
    model = MultimodalClassifier(cfg, len(labels), vision, text).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if mode == "bf16+compile" else model

    def step(batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"].to(device)
        train_step(step_model, model_inputs(batch, device), labels, optimizer, train_cfg, runtime)

    it = iter(loader)
    for _ in range(3):
        step(next(it))
    _sync(device)
    start, seen = time.perf_counter(), 0
    for b in it:
        step(b)
        seen += len(b["labels"])
    _sync(device)
    return {
        "loader_samples_per_s": loader_rate,
        "end_to_end_samples_per_s": seen / (time.perf_counter() - start),
    }


def _timed(step, batch: int, steps: int, device: torch.device) -> float:
    for _ in range(5):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--modes", default="fp32,bf16,bf16+compile")
    parser.add_argument("--ref", type=Path, default=REF, help="the reference training loop")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    modes = args.modes.split(",") if device.type == "cuda" else ["fp32"]
    result: dict[str, object] = {
        "bench": "train_throughput",
        "device": str(device),
        "size": args.size,
        "batch": args.batch,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
        spec = importlib.util.spec_from_file_location("ref_train_loop", args.ref)
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
        reference = {m: ref.run(args.size, m, args.batch, args.steps) for m in modes}
        result["reference_samples_per_s"] = {m: round(v, 1) for m, v in reference.items()}
    mine = {m: ours(args.size, m, args.batch, args.steps, device) for m in modes}
    result["mmops_samples_per_s"] = {m: round(v, 1) for m, v in mine.items()}
    best = max(mine, key=mine.get)
    if device.type == "cuda":
        ref_best = max(reference.values())
        result["ratio_best_vs_reference_best"] = round(mine[best] / ref_best, 3)
        result["ratio_per_mode"] = {m: round(mine[m] / reference[m], 3) for m in modes}
    loaded = ours_with_loader(args.size, best, args.batch, args.steps, device, args.workers)
    result.update({k: round(v, 1) for k, v in loaded.items()})
    # >= 1: the loader supplies examples at least as fast as the step consumes them.
    result["ratio_loader_vs_step"] = round(loaded["loader_samples_per_s"] / mine[best], 3)
    result["ratio_end_to_end_vs_synthetic"] = round(
        loaded["end_to_end_samples_per_s"] / mine[best], 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
