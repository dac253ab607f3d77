"""The multimodal classifier: a vision encoder, a text encoder and a fusion head.

Encoders are built from the `model` section of params.yaml (small CNN and embedding encoders by
default, a ViT and a BERT on request), or loaded from a `save_pretrained` folder or hub name. A
saved model is one folder: weights as safetensors, the encoder configs, the labels and the
tokenizer, so it loads without the training code's params.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmops.config import ConfigError, ModelConfig, VisionConfig
from mmops.model.backbones import TowerOutput, from_pretrained, load_dual
from mmops.model.encoders import ConvEncoder, EmbeddingEncoder


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    image_embeds: torch.Tensor  # L2-normalised, for retrieval and the contrastive loss
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    # What the head reads, L2-normalised: the joint representation drift is also watched on.
    fused_embeds: torch.Tensor | None = None

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The embeddings by modality name, as served and monitored."""
        named = {"image": self.image_embeds, "text": self.text_embeds}
        if self.fused_embeds is not None:
            named["fused"] = self.fused_embeds
        return named


class MultimodalClassifier(nn.Module):
    """Image + text classifier with product, concat, late or cross-attention fusion.

    product (the default): the two summaries and their elementwise product into an MLP. The
    product lets the head read an interaction (the label is the digit *plus* the number in the
    instruction) without having to build it from sums; the summaries alone keep what one
    modality says by itself. concat: the summaries only. late: the product of L2-normalised
    embeddings. cross_attention: text tokens attend to image tokens (best with pretrained
    encoders).
    """

    def __init__(
        self, config: ModelConfig, num_labels: int, vision: nn.Module, text: nn.Module
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.text = text
        d = config.hidden_dim
        vision_width, text_width = encoder_width(vision), encoder_width(text)
        # A learned stand-in for an absent modality, so a missing image or text is an input,
        # not a crash, and modality dropout can teach the model to cope with it.
        self.missing_image = nn.Parameter(torch.zeros(1, 1, vision_width))
        self.missing_text = nn.Parameter(torch.zeros(1, 1, text_width))
        self.image_proj = nn.Linear(vision_width, d)
        self.text_proj = nn.Linear(text_width, d)
        # A pretrained tower's summary is its checkpoint's embedding, of its own width, with
        # its own stand-in for an absent modality; other encoders summarise in token 0.
        self.image_summary, self.missing_image_summary = _summary_head(vision, d)
        self.text_summary, self.missing_text_summary = _summary_head(text, d)
        scale = getattr(vision, "logit_scale_init", None)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1 / 0.07)) if scale is None else scale.clone()
        )
        if config.fusion == "cross_attention":
            layer = nn.TransformerDecoderLayer(
                d, config.fusion_heads, 4 * d, config.dropout, batch_first=True, norm_first=True
            )
            self.fusion = nn.TransformerDecoder(layer, config.fusion_layers)
            head_in = d
        elif config.fusion == "product":
            # Each summary at unit scale before the product: two small untrained projections
            # multiply to a vanishing term, and the interaction then takes epochs to find.
            self.fusion = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
            head_in = 3 * d
        else:
            self.fusion = None
            head_in = 2 * d if config.fusion == "concat" else 3 * d
        if config.fusion == "zero_shot":
            self.head = _zero_shot_head(vision, num_labels)
        else:
            self.head = nn.Sequential(
                nn.LayerNorm(head_in),
                nn.Linear(head_in, d),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(d, num_labels),
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_present: torch.Tensor,
        text_present: torch.Tensor,
    ) -> ModelOutput:
        if self.training and self.config.modality_dropout > 0:
            image_present, text_present = self._drop_modalities(image_present, text_present)
        image_tokens, image_summary = _encode(self.vision(pixel_values=pixel_values))
        if self.config.fusion == "zero_shot":
            return self._zero_shot(image_summary, image_present)
        text_output = self.text(input_ids=input_ids, attention_mask=attention_mask)
        text_tokens, text_summary = _encode(text_output)
        image_tokens = torch.where(
            image_present[:, None, None], image_tokens, self.missing_image.to(image_tokens.dtype)
        )
        text_tokens = torch.where(
            text_present[:, None, None], text_tokens, self.missing_text.to(text_tokens.dtype)
        )
        image_pooled = _pooled(
            image_tokens,
            image_summary,
            image_present,
            (self.image_proj, self.image_summary, self.missing_image_summary),
        )
        text_pooled = _pooled(
            text_tokens,
            text_summary,
            text_present,
            (self.text_proj, self.text_summary, self.missing_text_summary),
        )
        image_embeds = F.normalize(image_pooled, dim=-1)
        text_embeds = F.normalize(text_pooled, dim=-1)
        if self.config.fusion == "cross_attention":
            fused = self.fusion(
                self.text_proj(text_tokens),
                self.image_proj(image_tokens),
                tgt_key_padding_mask=attention_mask == 0,
            )[:, 0]
        elif self.config.fusion == "concat":
            fused = torch.cat([image_pooled, text_pooled], dim=-1)
        elif self.config.fusion == "product":
            image_unit, text_unit = self.fusion[0](image_pooled), self.fusion[1](text_pooled)
            fused = torch.cat([image_unit, text_unit, image_unit * text_unit], dim=-1)
        else:
            fused = torch.cat([image_embeds, text_embeds, image_embeds * text_embeds], dim=-1)
        return ModelOutput(
            self.head(fused),
            image_embeds,
            text_embeds,
            self.logit_scale.exp(),
            F.normalize(fused, dim=-1),
        )

    def _zero_shot(self, summary: torch.Tensor, present: torch.Tensor) -> ModelOutput:
        """Cosine similarity of the checkpoint's image embedding with each label's prompt
        embedding (the head's rows, scaled): the image alone, as the checkpoint was trained."""
        missing = self.missing_image_summary
        assert missing is not None  # _zero_shot_head refused encoders without a summary
        summary = torch.where(present[:, None], summary, missing.to(summary.dtype))
        embeds = F.normalize(summary, dim=-1)
        return ModelOutput(self.head(embeds), embeds, embeds, self.logit_scale.exp(), embeds)

    def _drop_modalities(
        self, image_present: torch.Tensor, text_present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.config.modality_dropout
        drop = torch.rand(image_present.shape[0], device=image_present.device) < p
        # Never drop both: an example with neither modality teaches nothing.
        drop_image = drop & (torch.rand_like(drop, dtype=torch.float) < 0.5)
        drop_text = drop & ~drop_image
        return image_present & ~drop_image, text_present & ~drop_text


def contrastive_loss(output: ModelOutput, pair_mask: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between image and text embeddings of the same example."""
    if pair_mask.sum() < 2:
        return output.logits.new_zeros(())
    image = output.image_embeds[pair_mask]
    text = output.text_embeds[pair_mask]
    logits = output.logit_scale.clamp(max=100) * image @ text.T
    target = torch.arange(len(image), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def build_encoders(config: ModelConfig, vocab_size: int) -> tuple[nn.Module, nn.Module]:
    """Vision and text encoders: both towers of `model.pretrained` (a dual encoder, read once),
    else each pretrained where the config names one, else built from config."""
    if config.pretrained:
        vision_tower, text_tower, _ = load_dual(config.pretrained)
        return vision_tower, text_tower
    if config.vision_pretrained:
        vision = from_pretrained("model.vision_pretrained", config.vision_pretrained)
    else:
        vision = build_vision(config)
    if config.text_pretrained:
        text = from_pretrained("model.text_pretrained", config.text_pretrained)
    else:
        text = build_text(config, vocab_size)
    return vision_part(vision), text_part(text)


def build_vision(config: ModelConfig) -> nn.Module:
    """The image encoder `model.vision` describes, freshly initialised."""
    v = config.vision
    if v.arch == "cnn":
        return ConvEncoder(config.image_size, v.channels, v.hidden_size, v.grid, config.dropout)
    from transformers import ViTConfig, ViTModel

    vision = ViTModel(
        ViTConfig(
            image_size=config.image_size,
            patch_size=v.patch_size,
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
            hidden_dropout_prob=config.dropout,
        ),
        add_pooling_layer=False,
    )
    set_stem(vision, v)
    return vision


def build_text(config: ModelConfig, vocab_size: int) -> nn.Module:
    """The text encoder `model.text` describes, freshly initialised."""
    t = config.text
    if t.arch == "embedding":
        return EmbeddingEncoder(vocab_size, t.hidden_size, config.max_text_length, config.dropout)
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=config.max_text_length,
            hidden_dropout_prob=config.dropout,
        ),
        add_pooling_layer=False,
    )


def encoder_width(encoder: nn.Module) -> int:
    """The width of an encoder's tokens: mmops encoders say it, transformers configs hold it."""
    return getattr(encoder, "width", None) or encoder.config.hidden_size


def is_transformers(encoder: nn.Module) -> bool:
    """Whether the encoder is a transformers model (saved with its config) or an mmops one."""
    return hasattr(encoder, "config") and hasattr(encoder.config, "to_dict")


def _encode(output: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token states and, for a pretrained tower, its own summary."""
    if isinstance(output, TowerOutput):
        return output.tokens, output.summary
    # mmops encoders return the tokens; transformers models return them in an output record.
    tokens = output if isinstance(output, torch.Tensor) else output.last_hidden_state
    return tokens, None


def _pooled(
    tokens: torch.Tensor,
    summary: torch.Tensor | None,
    present: torch.Tensor,
    heads: tuple[nn.Module, nn.Module | None, nn.Parameter | None],
) -> torch.Tensor:
    """One modality's summary in the fusion's width: token 0, or the tower's own embedding."""
    token_proj, summary_proj, missing = heads
    if summary is None or summary_proj is None or missing is None:
        return token_proj(tokens[:, 0])
    summary = torch.where(present[:, None], summary, missing.to(summary.dtype))
    return summary_proj(summary)


def _zero_shot_head(vision: nn.Module, num_labels: int) -> nn.Linear:
    width = getattr(vision, "summary_width", None)
    if width is None:
        raise ConfigError(
            "model.fusion: zero_shot needs model.pretrained, a dual encoder (CLIP, SigLIP)"
        )
    # Rows: each label's prompt embedding times the checkpoint's scale (mmops.evaluation.zero_shot).
    return nn.Linear(width, num_labels, bias=False)


def _summary_head(encoder: nn.Module, width: int) -> tuple[nn.Module | None, nn.Parameter | None]:
    summary_width = getattr(encoder, "summary_width", None)
    if summary_width is None:
        return None, None
    return nn.Linear(summary_width, width), nn.Parameter(torch.zeros(1, summary_width))


class ConvStem(nn.Module):
    """Pixels to a grid of patch features: per halving of the patch size, a 3x3 stride-2 and
    a 3x3 stride-1 convolution (each with batch norm and ReLU), then a 1x1 to the ViT's width.

    Takes the place of the ViT's linear patch projection and gives the same grid: convolutions
    see edges and corners inside a patch that a linear projection of raw pixels learns slowly
    ("Early Convolutions Help Transformers See Better", Xiao et al., 2021).
    """

    def __init__(self, channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        stages = int(math.log2(patch_size))
        widths = [max(width >> (stages - 1 - i), 8) for i in range(stages)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip([channels, *widths[:-1]], widths, strict=True):
            for conv_in, stride in ((c_in, 2), (c_out, 1)):
                layers += [
                    nn.Conv2d(conv_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    # ReLU, not GELU: exported, each convolution, its batch norm and its ReLU
                    # fuse into one quantized ONNX Runtime kernel.
                    nn.ReLU(),
                ]
        layers.append(nn.Conv2d(widths[-1], width, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        # ViTModel reads the projection's weight for the dtype to cast pixels to.
        return self.layers[0].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


def set_stem(vision: nn.Module, config: VisionConfig) -> None:
    if config.stem == "conv":
        vision.embeddings.patch_embeddings.projection = ConvStem(
            vision.config.num_channels, vision.config.hidden_size, config.patch_size
        )


def vision_part(model: nn.Module) -> nn.Module:
    # A full CLIP checkpoint holds both towers; take the one asked for.
    return _strip_pooler(getattr(model, "vision_model", model))


def text_part(model: nn.Module) -> nn.Module:
    return _strip_pooler(getattr(model, "text_model", model))


def _strip_pooler(model: nn.Module) -> nn.Module:
    # The fusion reads token states; an unused pooler would hold weights that never get a
    # gradient, which DistributedDataParallel rejects, and make saved and rebuilt models differ.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def count_parameters(model: nn.Module, skip: str | None = None) -> int:
    """Parameters of `model`, leaving out those whose name contains `skip`."""
    return sum(p.numel() for n, p in model.named_parameters() if not (skip and skip in n))
