"""A trained ALBEF checkpoint as a Python object: features, image-text matching, retrieval, VQA answers,
zero-shot classification, SNLI-VE / NLVR2 predictions and Grad-CAM, one call each.

    from models.api import load_model
    albef = load_model("output/toy_pretrain/checkpoint_15.pth")        # task, sizes, resolution: its own
    albef.match(["a.png", "b.png"], ["a red circle", "two blue squares"])  # {'itm': (2, 2), 'itc': (2, 2)}

:func:`load_model` reads the checkpoint once: its task (the metadata this project writes, else guessed from its
keys), the model sizes and resolution (``models.checkpoint_info.architecture``) and the text preprocessing
(``max_words`` / ``max_tokens`` of its config; the bundled ``bert-base-uncased`` vocabulary unless the metadata
names another). It builds the task model without momentum twins and queues (inference needs neither) and loads
it through ``models.checkpoint.load_weights``: a checkpoint that does not fit stops with one clear message.

Images are file paths, PIL images, or tensors already preprocessed (``(3, R, R)`` or ``(B, 3, R, R)`` at the
checkpoint's resolution, CLIP-normalised). Work is batched (``batch_size``), runs under
``torch.inference_mode()`` (Grad-CAM: with gradients) and, on CUDA, under bf16 autocast (``amp='off'``: fp32).
Outputs are float32 CPU tensors or plain Python values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from dataset.caption import pre_caption, pre_question
from dataset.image_io import load_image
from dataset.transforms import build_transform
from models.checkpoint import load_weights, read_state_dict
from models.checkpoint_info import architecture, guess_task
from models.retrieval_eval import RetrievalFeatures, eval_autocast, itc_topk, pair_scores, sorted_ranking
from models.retrieval_eval import encode_texts as encode_text_batches
from models.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "retrieval", "grounding", "vqa", "ve", "nlvr", "nlvr_pretrain")
CONTRASTIVE_TASKS = ("pretrain", "retrieval", "grounding")  # ITC projections and the ITM head
PAIR_CLASSES = {"ve": ("contradiction", "neutral", "entailment"), "nlvr": ("False", "True")}
ImageInput = str | Image.Image | Tensor
QUESTION_WORDS = 50  # words kept of a test question (official pre_question at evaluation; max_words_test)
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # zero-shot prompts: class name -> text


def build_task_model(task: str, config: Any, decoder_layers: int | None = None,
                     tokenizer: TextTokenizer | None = None) -> nn.Module:
    """The task's model for inference: no momentum twins, no queues (``config`` an ``ALBEFConfig``)."""
    from models.model_nlvr import ALBEFNLVR
    from models.model_pretrain import ALBEFPretrain
    from models.model_pretrain_nlvr import ALBEFPretrainNLVR
    from models.model_retrieval import ALBEFRetrieval
    from models.model_ve import ALBEFVE
    from models.model_vqa import ALBEFVQA

    tok = tokenizer or TextTokenizer()
    builders = {"pretrain": lambda: ALBEFPretrain(config, tok.pad_token_id, tok.cls_token_id, tok.mask_token_id),
                "retrieval": lambda: ALBEFRetrieval(config), "grounding": lambda: ALBEFRetrieval(config),
                "vqa": lambda: ALBEFVQA(config, decoder_layers, tok.pad_token_id), "ve": lambda: ALBEFVE(config),
                "nlvr": lambda: ALBEFNLVR(config), "nlvr_pretrain": lambda: ALBEFPretrainNLVR(config)}
    if task not in builders:
        raise ValueError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    model = builders[task]()
    for _, twin in list(getattr(model, "momentum_pairs", [])):
        delattr(model, twin)
    model.momentum_pairs = []
    for buffer in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        if buffer in model._buffers:
            delattr(model, buffer)
    return model


def load_model(checkpoint: str, task: str | None = None, device: str | torch.device | None = None,
               amp: str = "bf16", batch_size: int | None = None, allow_partial: bool = False) -> ALBEFInference:
    """Load ``checkpoint`` (any format in circulation) for inference.

    ``task``: one of :data:`TASKS`; default: the checkpoint's (metadata, else guessed from its keys; a
    pre-training checkpoint serves retrieval too). ``device``: default CUDA when available. ``batch_size``: images
    (and texts) per forward pass, default the checkpoint config's evaluation batch or 64.
    Raises ``FileNotFoundError``, ``models.checkpoint.CheckpointError`` (not a checkpoint, or it does not fit the
    task's model) or ``ValueError`` (no task known).
    """
    state, ckpt = read_state_dict(checkpoint)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    task = task or meta.get("task") or guess_task(state)
    if task not in TASKS:
        raise ValueError(f"{checkpoint}: cannot tell its task ({task!r}); pass task= one of {', '.join(TASKS)}")
    tokenizer = TextTokenizer((meta.get("text") or {}).get("tokenizer") or "bert-base-uncased")
    model_config, decoder_layers = architecture(state, ckpt, task)
    model = build_task_model(task, model_config, decoder_layers, tokenizer)
    load_weights(model, {"model": state, **ckpt}, allow_partial=allow_partial, name=checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    logger.info("%s: %s model at %d px on %s", checkpoint, task, model_config.image_res, device)
    return ALBEFInference(model.to(device).eval(), task, tokenizer, config, meta, device, amp, batch_size)


@dataclass
class Gallery:
    """Features of a retrieval gallery, computed once (:meth:`ALBEFInference.index`)."""

    kind: str  # 'image' or 'text'
    items: list[str]  # labels: image paths (or 'image N'), or the texts
    embeds: Tensor  # (N, S, D) image tokens or (N, T, H) text states
    feat: Tensor  # (N, E) normalised ITC features
    atts: Tensor | None = None  # (N, T) text masks


class ALBEFInference:
    """Inference over a loaded task model; see the module docstring. Build with :func:`load_model`."""

    def __init__(self, model: nn.Module, task: str, tokenizer: TextTokenizer, config: dict, meta: dict,
                 device: torch.device, amp: str = "bf16", batch_size: int | None = None) -> None:
        self.model, self.task, self.tokenizer, self.config, self.meta = model, task, tokenizer, config, meta
        self.device, self.amp = device, amp
        self.image_res = model.config.image_res
        self.transform = build_transform("test", self.image_res)
        text = meta.get("text") or {}
        self.max_words = int(text.get("max_words") or config.get("max_words") or 30)
        limit = model.config.bert.max_position_embeddings
        self.max_tokens = min(int(text.get("max_tokens") or config.get("max_tokens") or 30), limit)
        self.batch_size = batch_size or int(config.get("batch_size_test") or config.get("batch_size") or 64)
        self.text_batch = int(config.get("text_batch") or 256)

    # ------------------------------------------------------------------ inputs
    def _require(self, tasks: Sequence[str], what: str) -> None:
        if self.task not in tasks:
            raise ValueError(f"{what} needs a {' / '.join(tasks)} checkpoint; this one is {self.task}")

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Images -> (B, 3, R, R) float tensor on the CPU (the checkpoint's resolution and normalisation)."""
        if isinstance(images, Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, self.image_res, self.image_res):
                raise ValueError(f"image tensors must be (B, 3, {self.image_res}, {self.image_res}), got "
                                 f"{tuple(images.shape)}")
            return batch.float()
        items = [images] if isinstance(images, (str, Image.Image)) else list(images)
        out = []
        for item in items:
            if isinstance(item, Tensor):
                out.append(self.preprocess(item))
                continue
            picture = load_image(item) if isinstance(item, str) else item.convert("RGB")
            out.append(self.transform(picture)[None])
        return torch.cat(out) if out else torch.zeros(0, 3, self.image_res, self.image_res)

    @staticmethod
    def _texts(texts: str | Sequence[str]) -> list[str]:
        return [texts] if isinstance(texts, str) else list(texts)

    def _autocast(self) -> Any:
        return eval_autocast(self.device, self.amp)

    @torch.inference_mode()
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> tuple[Tensor, Tensor | None]:
        """(N, S, D) ViT tokens and (N, E) ITC features (None without projections), batched."""
        pixels = self.preprocess(images)
        embeds, feats = [], []
        has_proj = hasattr(self.model, "vision_proj")
        for start in range(0, pixels.size(0), self.batch_size):
            batch = pixels[start:start + self.batch_size].to(self.device)
            with self._autocast():
                if has_proj:
                    image_embeds, image_feat = self.model.encode_image(batch)
                    feats.append(image_feat.float())
                else:
                    image_embeds = self.model.visual_encoder(batch)
            embeds.append(image_embeds)
        return torch.cat(embeds), (torch.cat(feats) if feats else None)

    @torch.inference_mode()
    def encode_texts(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Cleaned texts -> text-layer states (M, T, H), masks (M, T), ITC features (M, E) (as the evaluator)."""
        cleaned = [pre_caption(t, self.max_words) for t in self._texts(texts)]
        return encode_text_batches(self.model, cleaned, self.tokenizer, self.device, self.text_batch, self.max_tokens,
                            self.amp)

    # ------------------------------------------------------------------ features and matching
    @torch.inference_mode()
    def extract_features(self, images: Any = None, texts: Any = None) -> dict[str, Tensor]:
        """Unimodal outputs: ``image_embeds`` (N, 1+P, D) and ``image_feat`` (N, E); ``text_embeds`` (M, T, H),
        ``text_atts`` (M, T) and ``text_feat`` (M, E) (``*_feat``: normalised ITC features, where the checkpoint
        has the projections). With both (N == M, paired): also ``multimodal_embeds`` (N, T, H), the fused states."""
        if images is None and texts is None:
            raise ValueError("extract_features needs images, texts or both")
        out: dict[str, Tensor] = {}
        if images is not None:
            out["image_embeds"], image_feat = self.encode_images(images)
            if image_feat is not None:
                out["image_feat"] = image_feat
        if texts is not None:
            self._require(("pretrain", "retrieval", "grounding", "vqa", "ve"), "text features")
            out["text_embeds"], out["text_atts"], text_feat = self.encode_texts(texts)
            if hasattr(self.model, "text_proj"):
                out["text_feat"] = text_feat
        if images is not None and texts is not None:
            if out["image_embeds"].size(0) != out["text_embeds"].size(0):
                raise ValueError("multimodal features pair image i with text i: give as many images as texts")
            fused = []
            for a in range(0, out["text_embeds"].size(0), self.batch_size):
                with self._autocast():
                    fused.append(self.model.bert.fuse(out["text_embeds"][a:a + self.batch_size],
                                                      out["text_atts"][a:a + self.batch_size],
                                                      out["image_embeds"][a:a + self.batch_size]))
            out["multimodal_embeds"] = torch.cat(fused)
        return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    def itm_probabilities(self, image_embeds: Tensor, text_embeds: Tensor, text_atts: Tensor, image_idx: Tensor,
                          text_idx: Tensor) -> Tensor:
        """ITM match probability (P,) of the pairs (image_idx[p], text_idx[p]), ``batch_size`` pairs a pass."""
        probs = []
        for a in range(0, image_idx.numel(), self.batch_size):
            i, t = image_idx[a:a + self.batch_size], text_idx[a:a + self.batch_size]
            with self._autocast():
                logits = self.model.itm_logits(text_embeds[t], text_atts[t], image_embeds[i])  # (b, 2)
            probs.append(logits.float().softmax(dim=-1)[:, 1])
        return torch.cat(probs) if probs else torch.zeros(0)

    @torch.inference_mode()
    def match(self, images: Any, texts: Any) -> dict[str, Tensor]:
        """Every (image, text) pair: ``itm`` (N, M) ITM match probabilities, ``itc`` (N, M) cosine similarities
        of the ITC features."""
        self._require(CONTRASTIVE_TASKS, "match")
        image_embeds, image_feat = self.encode_images(images)
        text_embeds, text_atts, text_feat = self.encode_texts(texts)
        n, m = image_embeds.size(0), text_embeds.size(0)
        grid_i, grid_t = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
        itm = self.itm_probabilities(image_embeds, text_embeds, text_atts, grid_i.flatten().to(self.device),
                                     grid_t.flatten().to(self.device))
        return {"itm": itm.view(n, m).cpu(), "itc": (image_feat @ text_feat.t()).float().cpu()}

    # ------------------------------------------------------------------ retrieval
    @torch.inference_mode()
    def index(self, images: Any = None, texts: Any = None) -> Gallery:
        """Features of a gallery of images or of texts, computed once for many :meth:`retrieve` calls."""
        self._require(CONTRASTIVE_TASKS, "retrieval")
        if (images is None) == (texts is None):
            raise ValueError("index takes images or texts (one of them)")
        if images is not None:
            items = [images] if isinstance(images, (str, Image.Image)) else images
            labels = [x if isinstance(x, str) else f"image {i}" for i, x in enumerate(items)] \
                if not isinstance(items, Tensor) else [f"image {i}" for i in range(len(items))]
            embeds, feat = self.encode_images(images)
            return Gallery("image", labels, embeds, feat)
        embeds, atts, feat = self.encode_texts(texts)
        return Gallery("text", self._texts(texts), embeds, feat, atts)

    @torch.inference_mode()
    def retrieve(self, query: Any, gallery: Gallery | Any, k: int = 5, k_test: int | None = None,
                 score: str = "itm") -> list[list[dict[str, Any]]]:
        """The ``k`` best gallery items for each query, as the retrieval evaluator ranks them.

        Texts query an image gallery, images a text gallery. ``gallery``: a :class:`Gallery` from :meth:`index`
        (an image gallery of file paths is built so), or items indexed now: a list of strings is taken as texts,
        anything else (PIL images, tensors) as images. The ITC similarity
        shortlists ``k_test`` candidates (default: the checkpoint config's ``k_test``, else 256), ranked by the
        ITM positive logit (``score='itm'``, official) or that plus the ITC similarity (``'itm+itc'``);
        ``k_test=0`` ranks by ITC alone. Each hit: ``{'index', 'item', 'score', 'itc'}``, best first.
        """
        if not isinstance(gallery, Gallery):
            gallery = self.index(texts=gallery) if isinstance(gallery, str) or (
                isinstance(gallery, Sequence) and all(isinstance(g, str) for g in gallery)) else self.index(gallery)
        if gallery.kind == "image":
            text = self.index(texts=query)
            feats = RetrievalFeatures(gallery.embeds, gallery.feat, text.embeds, text.atts, text.feat)
            queries, keys = feats.text_feat, feats.image_feat
        else:
            image = self.index(images=query)
            feats = RetrievalFeatures(image.embeds, image.feat, gallery.embeds, gallery.atts, gallery.feat)
            queries, keys = feats.image_feat, feats.text_feat
        k_test = int(self.config.get("k_test", 256)) if k_test is None else k_test
        depth = min(max(k, k_test), keys.size(0))
        sims, candidates = itc_topk(queries, keys, depth)  # (Q, depth)
        scores = sims
        if k_test > 0:
            rows = torch.arange(queries.size(0), device=candidates.device).repeat_interleave(depth)
            pairs = (candidates.flatten(), rows) if gallery.kind == "image" else (rows, candidates.flatten())
            image_idx, text_idx = pairs
            scores = pair_scores(self.model, feats, image_idx, text_idx, self.batch_size, self.amp).view_as(sims)
            scores = scores + sims if score == "itm+itc" else scores
        ranking = sorted_ranking(candidates, scores)
        itc = {(q, int(c)): float(s) for q in range(sims.size(0)) for c, s in zip(candidates[q], sims[q])}
        return [[{"index": int(c), "item": gallery.items[int(c)], "score": float(s), "itc": itc[(q, int(c))]}
                 for c, s in zip(ranking.indices[q, :k], ranking.scores[q, :k])] for q in range(sims.size(0))]

    # ------------------------------------------------------------------ task heads
    @torch.inference_mode()
    def answer(self, images: Any, questions: str | Sequence[str], candidates: Sequence[str] | None = None,
               top_n: int = 5, k: int | None = None) -> list[list[tuple[str, float]]]:
        """VQA: the ``top_n`` (answer, probability) of each (image i, question i), ranked over ``candidates``
        (default: the checkpoint config's ``answer_list`` file) as the official ``rank_answer``: the ``k`` answers
        of highest first-token probability (default the config's ``k_test``, else 128), their whole likelihood,
        a softmax over the k."""
        from models.vqa_rank import tokenize_answers, top_answers

        self._require(("vqa",), "answer")
        candidates = list(candidates) if candidates is not None else self._answer_list()
        words = int(self.config.get("max_words_test") or QUESTION_WORDS)
        questions = [pre_question(q, words) for q in self._texts(questions)]
        pixels = self.preprocess(images)
        if pixels.size(0) != len(questions):
            raise ValueError(f"answer pairs image i with question i: {pixels.size(0)} images, {len(questions)} "
                             "questions")
        limit = self.model.config.bert.max_position_embeddings  # test questions are not truncated (official)
        answers = tokenize_answers(self.tokenizer, candidates, self.config.get("eos") or "[SEP]", limit)
        answers = answers.to(self.device)
        k = min(int(k or self.config.get("k_test") or 128), len(candidates))
        out: list[list[tuple[str, float]]] = []
        for a in range(0, len(questions), self.batch_size):
            text = self.tokenizer(questions[a:a + self.batch_size], max_length=limit).to(self.device)
            with self._autocast():
                ids, probs = self.model.rank(pixels[a:a + self.batch_size].to(self.device), text.input_ids,
                                             text.attention_mask, answers.input_ids, answers.attention_mask, k)
            out += top_answers(ids.cpu(), probs.float().cpu(), candidates, top_n)
        return out

    def _answer_list(self) -> list[str]:
        from dataset.vqa_dataset import load_answer_list
        from models.checkpoint_info import project_path

        path = self.config.get("answer_list")
        if not isinstance(path, str) or not path or not os.path.isfile(project_path(path)):
            raise ValueError(f"this VQA checkpoint's answer_list ({path or 'none'}) is not here: pass candidates=[...]")
        return load_answer_list(project_path(path))

    @torch.inference_mode()
    def classify_pairs(self, images: Any, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """SNLI-VE: (image i, hypothesis i) -> contradiction / neutral / entailment; NLVR2: ((image a, image b) i,
        statement i) -> False / True. Each: ``{'label', 'probs': {class: probability}}``, as the evaluator
        (same cleaning, tokenisation and batching)."""
        self._require(tuple(PAIR_CLASSES), "classify_pairs")
        texts = [pre_caption(t, self.max_words) for t in self._texts(texts)]
        if self.task == "nlvr":
            pairs = list(images)
            first, second = self.preprocess([p[0] for p in pairs]), self.preprocess([p[1] for p in pairs])
        else:
            first, second = self.preprocess(images), None
        if first.size(0) != len(texts):
            raise ValueError(f"classify_pairs pairs image(s) i with text i: {first.size(0)} vs {len(texts)} texts")
        probs = []
        for a in range(0, len(texts), self.batch_size):
            text = self.tokenizer(texts[a:a + self.batch_size], max_length=self.max_tokens).to(self.device)
            image = first[a:a + self.batch_size]
            if second is not None:  # the model reads the first images, then the second images
                image = torch.cat([image, second[a:a + self.batch_size]])
            with self._autocast():
                logits = self.model.logits(image.to(self.device), text.input_ids, text.attention_mask)
            probs.append(logits.float().softmax(dim=-1).cpu())
        names = PAIR_CLASSES[self.task]
        return [{"label": names[int(p.argmax())], "probs": dict(zip(names, p.tolist()))} for p in torch.cat(probs)]

    def gradcam(self, image: ImageInput, text: str, mode: str = "itm", per_word: bool = True,
                block_num: int | None = None) -> dict[str, Any]:
        """Grad-CAM of one (image, text) pair (``models.gradcam``, paper Figs. 4-6): ``map`` (G, G) for the
        sentence, ``words`` [(token, (G, G) map)] for every token after [CLS] (``itm`` mode), ``score`` (the ITM
        positive logit or the ITC similarity), ``text`` (the cleaned text); G = resolution / patch size."""
        from models.gradcam import gradcam

        self._require(CONTRASTIVE_TASKS, "gradcam")
        pixels = self.preprocess(image)[:1].to(self.device)
        cleaned = pre_caption(text, self.max_words)
        batch = self.tokenizer([cleaned], max_length=self.model.config.bert.max_position_embeddings).to(self.device)
        out = gradcam(self.model, pixels, batch.input_ids, batch.attention_mask, mode=mode, block_num=block_num)
        words = []
        if per_word and "token_maps" in out:
            tokens = self.tokenizer.backend.convert_ids_to_tokens(batch.input_ids[0].tolist())
            words = [(token, out["token_maps"][0, i].float().cpu()) for i, token in enumerate(tokens) if i > 0]
        return {"map": out["map"][0].float().cpu(), "words": words, "score": float(out["score"][0]), "text": cleaned}

    # ------------------------------------------------------------------ zero-shot classification
    def classify(self, images: Any, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 rerank: int = 0, top_n: int = 5) -> dict[str, Any]:
        """Zero-shot classification by ITC (``models.zero_shot.classify``; ``rerank``: ITM on the best classes)."""
        from models.zero_shot import classify

        return classify(self, images, class_names, templates, rerank, top_n)

    def evaluate_folder(self, root: str, templates: Sequence[str] = DEFAULT_TEMPLATES, rerank: int = 0) -> dict:
        """Zero-shot accuracy over an ImageFolder-style directory ``root/<class>/<image>`` (class = folder name,
        ``_`` read as a space): ``models.zero_shot.evaluate_folder``."""
        from models.zero_shot import evaluate_folder

        return evaluate_folder(self, root, templates, rerank)
