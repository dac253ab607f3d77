"""Default params on a dataset the platform has never seen, against a simple MLP baseline.

The dataset (written here, in the contract, unlike the demo data): each image holds 1 to 4 dots of
one colour on a noisy background, plus a grey bar at a random angle; each text asks how many dots
there are, what colour they are, or whether there are more than two. Labels need both modalities.
The baseline is an MLP on concatenated raw pixels (16x16) and text one-hot (bag of words)
features, trained with early stopping on the same splits. Prints one JSON line:

    python bench/unseen_dataset.py [--n 2000] [--set train.epochs=20 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmops.config import load_params
from mmops.data.dataset import load_splits, read_manifest
from mmops.evaluation.evaluate import evaluate_model
from mmops.training.train import train

COLOURS = {"crimson": (200, 30, 60), "teal": (20, 150, 140), "orange": (240, 140, 20)}
COUNTS = ("one", "two", "three", "four")
QUESTIONS = {
    "count": ("How many dots are there?", "Count the dots.", "number of spots?"),
    "colour": ("What colour are the dots?", "Which colour are the spots?", "dot colour?"),
    "many": ("Are there more than two dots?", "More than two spots, yes or no?"),
}


def write_dataset(root: Path, n: int, seed: int) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        count = int(rng.integers(1, 5))
        colour = str(rng.choice(list(COLOURS)))
        asked = str(rng.choice(list(QUESTIONS)))
        label = {
            "count": COUNTS[count - 1],
            "colour": colour,
            "many": "yes" if count > 2 else "no",
        }[asked]
        image = Image.fromarray(rng.normal(128, 10, (48, 48, 3)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        angle = rng.uniform(0, np.pi)
        c = 24 + 18 * np.array([np.cos(angle), np.sin(angle)])
        draw.line([tuple(48 - c), tuple(c)], fill=(90, 90, 90), width=3)
        centres: list[np.ndarray] = []
        while len(centres) < count:
            p = rng.uniform(6, 42, 2)
            if all(np.linalg.norm(p - q) > 10 for q in centres):
                centres.append(p)
        for x, y in centres:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLOURS[colour])
        path = f"img/{i:05d}.png"
        image.save(root / path)
        text = str(rng.choice(QUESTIONS[asked]))
        lines.append(json.dumps({"id": f"u{i:05d}", "image": path, "text": text, "label": label}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def features(root: Path, frame, vocab: dict[str, int]) -> torch.Tensor:
    pixels = np.stack(
        [
            np.asarray(
                Image.open(root / p).convert("RGB").resize((16, 16)), dtype=np.float32
            ).ravel()
            / 255
            for p in frame["image"]
        ]
    )
    words = np.zeros((len(frame), len(vocab)), dtype=np.float32)
    for row, text in enumerate(frame["text"]):
        for word in text.lower().replace("?", " ").replace(",", " ").split():
            if word in vocab:
                words[row, vocab[word]] = 1.0
    return torch.from_numpy(np.concatenate([pixels, words], axis=1))


def mlp_baseline(root: Path, frame, seed: int) -> float:
    """Test accuracy of a one-hidden-layer MLP, early-stopped on val accuracy."""
    torch.manual_seed(seed)
    parts = {s: frame[frame["split"] == s] for s in ("train", "val", "test")}
    labels = sorted(parts["train"]["label"].unique())
    index = {label: i for i, label in enumerate(labels)}
    vocab_words = sorted(
        {
            w
            for t in parts["train"]["text"]
            for w in t.lower().replace("?", " ").replace(",", " ").split()
        }
    )
    vocab = {w: i for i, w in enumerate(vocab_words)}
    x = {s: features(root, f, vocab) for s, f in parts.items()}
    y = {s: torch.tensor([index.get(label, -1) for label in f["label"]]) for s, f in parts.items()}
    model = torch.nn.Sequential(
        torch.nn.Linear(x["train"].shape[1], 512),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(512, len(labels)),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    best_val, best_state, bad = -1.0, None, 0
    for _epoch in range(300):
        model.train()
        for batch in torch.randperm(len(y["train"])).split(64):
            loss = torch.nn.functional.cross_entropy(model(x["train"][batch]), y["train"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val = (model(x["val"]).argmax(1) == y["val"]).float().mean().item()
        if val > best_val:
            best_val, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= 20:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        return (model(x["test"]).argmax(1) == y["test"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmops-unseen-"))
    root = work / "data"
    write_dataset(root, args.n, args.seed)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", args.overrides)
    assert len(read_manifest(root)) == args.n
    frame = load_splits(root, params)

    start = time.perf_counter()
    baseline = mlp_baseline(root, frame, args.seed)
    baseline_s = time.perf_counter() - start
    start = time.perf_counter()
    result = train(root, params, out_dir=work / "train", progress=False)
    report = evaluate_model(result.model_dir, root, params, work / "evaluate")
    accuracy = report.classification.accuracy
    mmops_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": "unseen_dataset",
                "rows": args.n,
                "mmops_test_accuracy": round(accuracy, 4),
                "mmops_image_only": round(report.ablation.image_only, 4),
                "mmops_text_only": round(report.ablation.text_only, 4),
                "mlp_test_accuracy": round(baseline, 4),
                "ratio_mmops_vs_mlp": round(accuracy / max(baseline, 1e-9), 3),
                "mmops_seconds": round(mmops_s, 1),
                "mlp_seconds": round(baseline_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
