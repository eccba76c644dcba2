"""The shared ALBEF body: encoders, projections, momentum twins, feature queues, similarities, ITM.

Task models (pre-training, retrieval, ...) subclass :class:`ALBEFBase` and add only their losses.
Nothing here computes a task loss. Parameter and buffer names are those of the released checkpoints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import distributed
from models.bert import BertConfig, BertForMaskedLM, BertModel, ImageKV
from models.losses import itm_loss, sample_negatives
from models.vit import build_vit, vit_sizes


@dataclass
class ALBEFConfig:
    """Architecture and objective settings shared by the task models (from the YAML config)."""

    bert: BertConfig = field(default_factory=BertConfig)
    image_res: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    mlm_probability: float = 0.15
    distill: bool = True
    grad_ckpt: bool = False

    @classmethod
    def from_config(cls, config: dict, bert_config_path: str | None = None) -> ALBEFConfig:
        """Build from a task's resolved YAML config (keys ``image_res``, ``vision_width``, ``vit`` ...)."""
        vit = vit_sizes(config)
        bert = BertConfig.from_json(bert_config_path or config["bert_config"])
        if bert.encoder_width != config.get("vision_width", bert.encoder_width):
            raise ValueError(f"{config['bert_config']}: encoder_width {bert.encoder_width} differs from "
                             f"vision_width {config['vision_width']}")
        return cls(
            bert=bert, image_res=vit["image_res"], patch_size=vit["patch_size"], vision_width=vit["width"],
            vision_depth=vit["depth"], vision_heads=vit["heads"], embed_dim=config.get("embed_dim", 256),
            temp=config.get("temp", 0.07), queue_size=config.get("queue_size", 65536),
            momentum=config.get("momentum", 0.995), mlm_probability=config.get("mlm_probability", 0.15),
            distill=config.get("distill", True), grad_ckpt=config.get("grad_ckpt", False),
        )


class ALBEFBase(nn.Module):
    """Image encoder, text/fusion BERT, projections, ``temp``, ``itm_head`` and optional momentum twins.

    ``mlm_head=True`` builds ``text_encoder`` as BERT with the MLM head (keys ``text_encoder.bert.*``,
    ``text_encoder.cls.*``, as ``ALBEF.pth``); otherwise a bare BERT (``text_encoder.*``, as ``mscoco.pth``).
    """

    def __init__(self, config: ALBEFConfig, mlm_head: bool = False, momentum: bool = True,
                 queue: bool = True) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = build_vit(config.image_res, config.patch_size, config.vision_width,
                                        config.vision_depth, config.vision_heads, grad_ckpt=config.grad_ckpt)
        self.text_encoder = BertForMaskedLM(config.bert) if mlm_head else BertModel(config.bert)
        self.bert.encoder.grad_ckpt = config.grad_ckpt
        text_width = config.bert.hidden_size
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        self.itm_head = nn.Linear(text_width, 2)
        self.momentum_pairs: list[tuple[str, str]] = []
        if momentum:
            for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
                self.add_momentum_twin(name)
        if queue:
            self.register_buffer("image_queue", F.normalize(torch.randn(config.embed_dim, config.queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(config.embed_dim, config.queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ----------------------------------------------------------------- parts
    @property
    def bert(self) -> BertModel:
        """The BERT body of the text encoder (with or without the MLM head)."""
        return self.text_encoder.bert if isinstance(self.text_encoder, BertForMaskedLM) else self.text_encoder

    @property
    def bert_m(self) -> BertModel:
        enc = self.text_encoder_m
        return enc.bert if isinstance(enc, BertForMaskedLM) else enc

    def add_momentum_twin(self, name: str) -> None:
        """Register ``name + '_m'``: a frozen copy of module ``name`` updated by EMA."""
        twin = copy.deepcopy(getattr(self, name))
        for p in twin.parameters():
            p.requires_grad_(False)
        setattr(self, name + "_m", twin)
        self.momentum_pairs.append((name, name + "_m"))

    def encode_image(self, image: Tensor, momentum: bool = False) -> tuple[Tensor, Tensor]:
        """(B, 3, R, R) -> image tokens (B, 1+N, D) and the normalised [CLS] feature (B, E)."""
        vit, proj = (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder, self.vision_proj)
        embeds = vit(image)
        return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False,
                    cls_only: bool = False) -> tuple[Tensor, Tensor]:
        """(B, T) ids -> text-layer states (B, T, H) and the normalised [CLS] feature (B, E).

        ``cls_only``: the states are (B, 1, H), [CLS] alone (the last text layer computes only that row).
        """
        bert, proj = (self.bert_m, self.text_proj_m) if momentum else (self.bert, self.text_proj)
        embeds = bert.encode_text(input_ids, attention_mask, cls_only=cls_only)
        return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)

    def itm_logits(self, text_embeds: Tensor, attention_mask: Tensor, image_embeds: Tensor | None,
                   image_kv: ImageKV | None = None, cls_only: bool = True) -> Tensor:
        """Fusion of (B, T, H) text states with (B, S, D) image tokens (or their ``image_kv``) -> ITM logits (B, 2).

        The head reads [CLS] only, so the last fusion layer computes that row alone; ``cls_only=False`` runs
        it on every token (the official code's work, for reference timings), with the same result.
        """
        fused = self.bert.fuse(text_embeds, attention_mask, image_embeds, image_kv=image_kv, cls_only=cls_only)
        return self.itm_head(fused[:, 0])

    # ------------------------------------------------------------- momentum
    @torch.no_grad()
    def momentum_update(self) -> None:
        """In-place EMA ``p_m = m * p_m + (1 - m) * p`` of every momentum twin (one foreach call)."""
        online, twins = [], []
        for name, name_m in self.momentum_pairs:
            online += list(getattr(self, name).parameters())
            twins += list(getattr(self, name_m).parameters())
        torch._foreach_lerp_(twins, online, 1.0 - self.config.momentum)

    @torch.no_grad()
    def momentum_features(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """EMA step, then the momentum image tokens (B, 1+N, D) and image, text features (B, E), (B, E)."""
        self.momentum_update()
        image_embeds_m, image_feat_m = self.encode_image(image, momentum=True)
        _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True, cls_only=True)
        return image_embeds_m, image_feat_m, text_feat_m

    @torch.no_grad()
    def copy_to_momentum(self, names: list[str] | None = None) -> None:
        """Set momentum twins equal to the online weights (all, or the named online modules)."""
        for name, name_m in self.momentum_pairs:
            if names is None or name in names:
                for p, p_m in zip(getattr(self, name).parameters(), getattr(self, name_m).parameters()):
                    p_m.copy_(p)

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Write the features of the GLOBAL batch into the ring-buffer queues (any batch size).

        image_feat, text_feat: (B_r, E) momentum features of this rank, idx: (B_r,) ids or None; gathered over
        ranks in rank order first so every rank holds the same queue. Ranks may hold different numbers of rows
        (a rank whose batch lost unreadable images): every row is written and the pointer advances by the
        global count on every rank. The oldest entries are overwritten; no host sync in one process.
        """
        width = image_feat.size(1)
        feats = distributed.all_gather_uneven(torch.cat([image_feat, text_feat.to(image_feat.dtype)], dim=1))
        image_feat, text_feat = feats[:, :width], feats[:, width:]  # (sum_r B_r, E) each
        columns = [(self.image_queue, image_feat), (self.text_queue, text_feat)]
        if idx is not None:
            columns.append((self.idx_queue, distributed.all_gather_uneven(idx)[:, None]))
        size = self.image_queue.size(1)
        n = min(image_feat.size(0), size)
        positions = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size  # (n,)
        for queue, values in columns:
            queue.index_copy_(1, positions, values[-n:].t().to(queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    # --------------------------------------------------------------- ITM
    def itm_with_hard_negatives(
        self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor,
        sim_i2t: Tensor, sim_t2i: Tensor, positive: Tensor, image_kv: ImageKV | None = None,
    ) -> Tensor:
        """ITM loss on B positives, B (text, hard-negative image) and B (hard-negative text, image) pairs.

        sim_i2t, sim_t2i: (B, B) in-batch similarities used as sampling weights (no gradient);
        positive: (B, B) bool, pairs that must not be drawn as negatives; image_kv: the cross-attention keys
        and values of ``image_embeds`` (``bert.image_keys_values``) if the caller has them. Each image is
        projected once and its keys and values gathered for the 3B pairs: the same math as fusing
        ``[image_embeds, image_embeds[neg], image_embeds]``, with a third of the projections.
        """
        bs = image_embeds.size(0)
        with torch.no_grad():
            neg_image, valid_image = sample_negatives(sim_t2i, positive)  # a negative image per text
            neg_text, valid_text = sample_negatives(sim_i2t, positive)  # a negative text per image
        if image_kv is None:
            image_kv = self.bert.image_keys_values(image_embeds)
        same = torch.arange(bs, device=neg_image.device)
        image_all = torch.cat([same, neg_image, same])  # (3B,) image of each pair
        kv_all = [(k.index_select(0, image_all), v.index_select(0, image_all)) for k, v in image_kv]  # (3B, S, H)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)  # (3B, T, H)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]], dim=0)
        logits = self.itm_logits(text_all, mask_all, None, image_kv=kv_all)  # (3B, 2)
        labels = torch.zeros(3 * bs, dtype=torch.long, device=logits.device)
        labels[:bs] = 1
        weight = torch.cat([torch.ones_like(valid_image), valid_image, valid_text]).to(logits.dtype)
        return itm_loss(logits, labels, weight)
