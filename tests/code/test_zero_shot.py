"""The zero-shot floor of a dual encoder: label prompts as a classifier head, saved as an ordinary
model, evaluated from the command line, and the baseline the gate holds a challenger to. Tiny
random checkpoints: chance accuracy, so these test the mechanics, not the figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dual_checkpoints import clip_checkpoint, siglip_checkpoint
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import ConfigError, GateConfig, ModelConfig, Params, load_params
from mmops.data.dataset import load_splits
from mmops.evaluation.evaluate import evaluate_model
from mmops.evaluation.records import BaselineResult, ZeroShotResult
from mmops.evaluation.zero_shot import build_zero_shot, dataset_labels, prompt
from mmops.model.classifier import MultimodalClassifier, build_encoders
from mmops.model.storage import load_model, save_model
from mmops.serving.predictor import Predictor
from mmops.tracking.gate import Score, gate

LABELS = ["red", "blue_square", "large"]
# Evaluation's slowest parts cut down: latency timing and the classical baseline's features.
FAST = (
    "evaluate.latency_repeats=1",
    "evaluate.latency_batch_sizes=[1]",
    "evaluate.baseline.image_size=4",
)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    build = clip_checkpoint if request.param == "clip" else siglip_checkpoint
    return build(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return clip_checkpoint(tmp_path_factory.mktemp("clip"))


def reference_rows(checkpoint: Path, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """Head rows from the checkpoint's own get_text_features, prompt by prompt, scaled."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    # SigLIP was trained on texts padded to its full length; CLIP reads each prompt as it is.
    pad = {"padding": "max_length", "max_length": 16} if model.config.model_type == "siglip" else {}
    rows = []
    with torch.no_grad():
        for label in labels:
            embeds = []
            for template in templates:
                text = template.replace("{label}", label.replace("_", " "))
                tokens = tokenizer([text], return_tensors="pt", **pad)
                features = model.get_text_features(**tokens).pooler_output[0]
                embeds.append(features / features.norm())
            mean = torch.stack(embeds).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows) * model.logit_scale.exp()


def test_head_rows_are_the_normalised_mean_prompt_embeddings_times_the_scale(
    dual: Path, tmp_path: Path
) -> None:
    params = load_params(
        None,
        ["zero_shot.templates=['a photo of a {label}.', '{label}', 'the {label}, on the left']"],
    )
    folder = build_zero_shot(str(dual), LABELS, params, tmp_path / "model")

    loaded = load_model(folder)

    expected = reference_rows(dual, LABELS, params.zero_shot.templates)
    assert loaded.model.config.fusion == "zero_shot" and loaded.labels == LABELS
    assert torch.allclose(loaded.model.head.weight, expected, atol=1e-5, rtol=1e-5)
    assert loaded.meta["zero_shot"] == {
        "checkpoint": str(dual),
        "templates": list(params.zero_shot.templates),
    }


def test_a_zero_shot_model_reloads_and_predicts_through_the_predictor_like_any_model(
    clip: Path, demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    from transformers import AutoModel

    labels = dataset_labels(load_splits(demo_dir, small_params))
    folder = build_zero_shot(str(clip), labels, small_params, tmp_path / "model")
    predictor = Predictor(folder, "torch")
    rows = load_splits(demo_dir, small_params).head(6)
    records = rows[["id", "image", "text"]].to_dict("records")

    results = predictor.predict_batch(records, demo_dir)

    assert [r["id"] for r in results] == list(rows["id"])
    assert all(
        r["label"] in labels and sum(r["scores"].values()) == pytest.approx(1) for r in results
    )
    # The image alone decides, as the checkpoint was trained: cosine with each label's prompts.
    batch = predictor.collate([predictor.example(r, demo_dir) for r in records])
    reference = AutoModel.from_pretrained(str(clip)).eval()
    with torch.no_grad():
        image = F.normalize(
            reference.get_image_features(
                pixel_values=torch.from_numpy(batch["pixel_values"])
            ).pooler_output
        )
        rows_ = reference_rows(clip, labels, small_params.zero_shot.templates)
        expected = (image @ rows_.T).softmax(-1)
    got = torch.tensor([[r["scores"][label] for label in labels] for r in results])
    assert torch.allclose(got, expected, atol=1e-5)
    no_text = predictor.predict_batch([{**records[0], "text": "something else entirely"}], demo_dir)
    assert no_text[0]["scores"] == pytest.approx(results[0]["scores"], abs=1e-6)


def test_zero_shot_command_saves_and_evaluates_the_model_and_prints_one_line(
    clip: Path, demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    sets = [arg for item in (*small_overrides, *FAST) for arg in ("--set", item)]
    args = ["zero-shot", "--data", str(demo_dir), "--model", str(clip), "--out", str(tmp_path)]

    result = CliRunner().invoke(app, [*args, *sets, "--json"])

    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)  # stdout holds the JSON alone
    assert figures["model_dir"] == str(tmp_path / "model") and 0 <= figures["accuracy"] <= 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("zero-shot")]
    assert f"zero-shot test accuracy {figures['accuracy']:.4f}" in line
    assert str(tmp_path / "model") in line
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == figures["accuracy"]
    assert "zero_shot" not in metrics  # a zero-shot model is the floor itself
    assert load_model(tmp_path / "model").model.config.fusion == "zero_shot"


def test_a_checkpoint_that_is_not_a_dual_encoder_is_one_error_line(
    demo_dir: Path, tmp_path: Path
) -> None:
    from transformers import ViTConfig, ViTModel

    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    ViTModel(vit).save_pretrained(str(tmp_path / "vit"))
    args = ["zero-shot", "--data", str(demo_dir), "--out", str(tmp_path / "out"), "--model"]

    result = CliRunner().invoke(app, [*args, str(tmp_path / "vit")])

    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a dual encoder" in errors[0], result.stderr
    assert "hint: give a CLIP or SigLIP checkpoint" in result.stderr


def test_evaluation_with_a_dual_encoder_records_its_zero_shot_floor(
    clip: Path, demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    params = load_params(None, [*small_overrides, *FAST, f"model.pretrained={clip}"])
    labels = dataset_labels(load_splits(demo_dir, params))
    # A model fine-tuned from the checkpoint, as far as evaluation can tell: its untrained head.
    config = replace(ModelConfig(), pretrained=str(clip), image_size=32, max_text_length=16)
    model = MultimodalClassifier(config, len(labels), *build_encoders(config, vocab_size=0))
    save_model(model, AutoTokenizer.from_pretrained(str(clip)), labels, tmp_path / "model")
    zero_shot_alone = load_params(None, [*small_overrides, *FAST])

    report = evaluate_model(tmp_path / "model", demo_dir, params, tmp_path / "report")

    assert report.zero_shot is not None and report.zero_shot.checkpoint == str(clip)
    assert report.zero_shot.labels == len(labels)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    gain = report.classification.accuracy - report.zero_shot.test_accuracy
    assert metrics["zero_shot"]["test_accuracy"] == report.zero_shot.test_accuracy
    assert metrics["zero_shot"]["gain"] == pytest.approx(gain)
    assert "## Zero-shot" in (tmp_path / "report" / "report.md").read_text()
    # The floor is the zero-shot model's own accuracy on the same test split.
    folder = build_zero_shot(str(clip), labels, zero_shot_alone, tmp_path / "zs")
    alone = evaluate_model(folder, demo_dir, zero_shot_alone, tmp_path / "zs-report")
    assert alone.zero_shot is None
    assert alone.classification.accuracy == pytest.approx(report.zero_shot.test_accuracy)


def test_templates_must_each_hold_the_label() -> None:
    with pytest.raises(ConfigError, match=r"zero_shot\.templates\[1\]"):
        load_params(None, ["zero_shot.templates=['a {label}', 'a photo']"])
    with pytest.raises(ConfigError, match=r"zero_shot\.templates"):
        load_params(None, ["zero_shot.templates=[]"])
    assert prompt("a photo of a {label}.", "traffic_light") == "a photo of a traffic light."


def score(accuracy: float) -> Score:
    return Score("1", accuracy, {}, 0.0, 10.0, "int8", [True])


def classical(accuracy: float) -> BaselineResult:
    return BaselineResult("mlp", 0.8, accuracy, 0.8, {"logistic": 0.5, "mlp": 0.8}, 100, 10, 1.0)


def zero_shot(accuracy: float) -> ZeroShotResult:
    return ZeroShotResult("clip", accuracy, accuracy, 5, ("{label}",), 1.0)


def test_the_first_champion_must_beat_a_zero_shot_above_the_classical_baseline() -> None:
    verdict = gate(score(0.85), None, GateConfig(), classical(0.80), zero_shot(0.90))

    assert not verdict.passed
    (reason,) = verdict.reasons
    assert "does not beat the zero-shot baseline's 0.9000" in reason
    assert "0.8500" in reason and "mlp baseline 0.8000" in reason and "zero-shot 0.9000" in reason
    assert "| gain over zero-shot (accuracy 0.9000) | -0.0500 | - |" in verdict.table()
    assert gate(score(0.91), None, GateConfig(), classical(0.80), zero_shot(0.90)).passed


def test_the_gate_holds_a_challenger_to_the_better_of_the_two_baselines() -> None:
    strict = GateConfig(min_gain_over_baseline=0.05)
    verdict = gate(score(0.93), None, strict, classical(0.80), zero_shot(0.90))
    assert not verdict.passed and "zero-shot" in verdict.reasons[0]
    assert "needs 0.9500" in verdict.reasons[0]
    # The classical baseline higher: it is the one named, zero-shot's figure beside it.
    (reason,) = gate(score(0.85), None, GateConfig(), classical(0.90), zero_shot(0.70)).reasons
    assert "does not beat the mlp baseline's 0.9000" in reason and "zero-shot 0.7000" in reason
    # Zero-shot alone (no classical figure): still a floor.
    assert not gate(score(0.85), None, GateConfig(), None, zero_shot(0.90)).passed
    # No dual encoder: the classical baseline's reason, word for word as before.
    (reason,) = gate(score(0.85), None, GateConfig(), classical(0.90)).reasons
    assert reason == (
        "accuracy 0.8500 does not beat the mlp baseline's 0.9000 by "
        "gate.min_gain_over_baseline 0.0 (needs 0.9000)"
    )


def test_the_zero_shot_floor_is_logged_on_the_evaluated_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from mmops.tracking.evaluate_run import log_zero_shot

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # set_tracking_uri also sets MLFLOW_TRACKING_URI, which later tests' subprocesses inherit:
    # monkeypatch puts the variable back as it was.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        # An experiment of this store: another test's active experiment id means nothing here.
        experiment = mlflow.set_experiment("zero-shot-floor")
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            log_zero_shot(zero_shot(0.6), accuracy=0.9)
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data
    finally:
        mlflow.set_tracking_uri(previous)

    assert logged.metrics["zero_shot_test_accuracy"] == 0.6
    assert logged.metrics["test.zero_shot_gain"] == pytest.approx(0.3)
    assert logged.tags["zero_shot_checkpoint"] == "clip"
