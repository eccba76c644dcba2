r"""ALBEF visual question answering: fine-tuning and answer ranking (paper Sec. 5, Fig. 3a; official ``VQA.py``).

    python VQA.py --config configs/toy/VQA.yaml --output_dir output/toy_vqa \
        --checkpoint output/toy_pretrain/checkpoint_15.pth
    python VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint vqa.pth --evaluate
    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint ALBEF.pth

Fine-tuning from a pre-training checkpoint initialises the answer decoder from the fusion layers and the MLM
head (``models.checkpoint``), as the official script; a ``vqa.pth`` loads as it is. Answers are ranked over
``answer_list`` (:mod:`models.vqa_rank`). After training (or with ``--evaluate``) every ``test_file`` question
gets one answer in ``output_dir/result/vqa_result_epoch{E}.json`` (``vqa_result.json`` with ``--evaluate``), the
``[{"question_id", "answer"}]`` file of the evaluation server. Where the questions have ground truth (items'
``answer``, or ``*_answers_file``), the VQA accuracy is logged, per question type too. With a ``val_file``, each
epoch is evaluated on it and ``val_acc`` picks ``checkpoint_best.pth``, whose answers make the test result.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, get_parser

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch

    from dataset import VQATestDataset
    from models.model_vqa import ALBEFVQA
    from models.tokenizer import TextTokenizer

logger = logging.getLogger("albef.vqa")

# Every accepted key with its default; this dict is the schema (unknown keys are rejected).
DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "train_file": [],  # JSON files of {image, question, answer, dataset: vqa|vg}
    "val_file": [],  # optional, with ground truth: picks the best epoch (val_acc)
    "test_file": [],  # JSON files of {image, question, question_id[, dataset]}
    "val_answers_file": "",  # optional {question_id: answer or [answers]} ground truth of val_file
    "test_answers_file": "",  # the same for test_file (a val split used as test; the toy world)
    "answer_list": "",  # JSON list of the candidate answers
    "vqa_root": "",  # images of 'vqa' items
    "vg_root": "",  # images of 'vg' items
    "question_types": [],  # [[name, regex], ...]: types of questions that carry none, for per-type accuracy
    "image_res": 384,
    "batch_size_train": 32,  # per GPU
    "batch_size_test": 16,
    "k_test": 128,  # candidates per question, picked by first-token probability
    "alpha": 0.4,
    "distill": True,
    "warm_up": True,  # ramp alpha over epoch 0
    "momentum": 0.995,  # hard-coded in the official VQA model
    "eos": "[SEP]",  # appended to every answer
    "max_words": 30,  # words kept by pre_question in training
    "max_words_test": 50,  # ... and at test
    "max_tokens": 25,  # question tokens (incl. [CLS]) in training; not truncated at test (official)
    "decoder_layers": 0,  # answer decoder depth; 0: the encoder's fusion-layer count (6, official)
    "top_n": 0,  # also write the n best answers of each question with their probabilities
    "crop_scale": [0.5, 1.0],  # RandomResizedCrop scale of fine-tuning
    "randaug": True,  # RandomAugment(2, 7) in training
    "eval_amp": "off",  # autocast of evaluation on CUDA: 'off' | 'bf16' | 'fp16'
    "optimizer": {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 2e-5, "epochs": 8, "min_lr": 1e-6, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 4, "cooldown_epochs": 0},
}


def vqa_config_problems(config: dict) -> list[str]:
    """The VQA keys the schema's types cannot check."""
    problems = []
    for key, low in (("k_test", 1), ("decoder_layers", 0), ("top_n", 0), ("max_words_test", 1)):
        if config[key] < low:
            problems.append(f"{key} must be >= {low}, got {config[key]}")
    if not config["eos"]:
        problems.append("eos must be a non-empty string (the official value is '[SEP]')")
    if not config["answer_list"]:
        problems.append("answer_list is not set: VQA ranks the answers of that JSON list")
    for rule in config["question_types"]:
        if not (isinstance(rule, list) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
            problems.append(f"question_types entries must be [name, regex], got {rule!r}")
            continue
        try:
            re.compile(rule[1])
        except re.error as exc:
            problems.append(f"question_types {rule[0]!r}: bad regex {rule[1]!r} ({exc})")
    return problems


CONFIG_CHECKS = (vqa_config_problems,)


def make_step_fn(tokenizer: TextTokenizer, config: dict, device: torch.device, answer_tokens: int) -> Callable:
    """Batch -> ``{'loss'}``; the batch is ``vqa_collate``'s (images, questions, answers, weights, counts)."""

    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        image, questions, answers, weights, counts = batch
        question = tokenizer(questions, max_length=config["max_tokens"]).to(device, non_blocking=True)
        answer = tokenizer(answers, max_length=answer_tokens).to(device, non_blocking=True)  # eos appended already
        return model(image.to(device, non_blocking=True), question.input_ids, question.attention_mask,
                     answer.input_ids, answer.attention_mask, counts.to(device), weights.to(device), alpha=alpha)

    return step


class Evaluator:
    """Answers every question of a :class:`VQATestDataset`, writes the result file, scores it when possible."""

    def __init__(self, config: dict, tokenizer: TextTokenizer, answer_list: list[str], device: torch.device,
                 output_dir: str, max_tokens: int) -> None:
        from models.vqa_rank import tokenize_answers

        self.config, self.tokenizer, self.answer_list, self.device = config, tokenizer, answer_list, device
        self.output_dir = output_dir
        self.max_tokens = max_tokens
        self.answers = tokenize_answers(tokenizer, answer_list, config["eos"], max_length=max_tokens)
        self.k = min(config["k_test"], len(answer_list))
        if self.k < config["k_test"]:
            logger.warning("k_test %d exceeds the %d answers of the list: ranking all of them", config["k_test"],
                           len(answer_list))

    def __call__(self, model: torch.nn.Module, dataset: VQATestDataset, name: str) -> dict:
        """Rank, write ``result/<name>.json`` (rank 0), return ``{'n', 'answered', 'result_file'[, 'acc',
        'per_type']}``."""
        from dataset.vqa_eval import accuracy_report
        from engine import distributed
        from models.vqa_rank import predict_answers

        cfg = self.config
        top_n = max(1, cfg["top_n"])
        index, ids, probs = predict_answers(model, dataset, self.tokenizer, self.answers, self.device, self.k,
                                            cfg["batch_size_test"], self.max_tokens, top_n, cfg["num_workers"],
                                            cfg["eval_amp"])
        order = index.tolist()
        if len(set(order)) != len(order):
            raise RuntimeError(f"{name}: a question was answered twice ({len(order)} answers, "
                               f"{len(set(order))} questions)")
        qids = [dataset.question_ids[i] for i in order]
        predicted = {qid: self.answer_list[row[0]] for qid, row in zip(qids, ids.tolist())}
        result = [{"question_id": qid, "answer": predicted[qid]} for qid in dataset.question_ids if qid in predicted]
        metrics: dict[str, Any] = {"n": len(dataset), "answered": len(result)}
        if len(result) < len(dataset):
            logger.error("%s: %d of %d questions have no answer (unreadable images); the result file lacks them",
                         name, len(dataset) - len(result), len(dataset))
        if distributed.is_main_process():
            metrics["result_file"] = self._write(name, result)
            if cfg["top_n"]:
                top = {qid: [[self.answer_list[a], p] for a, p in zip(r, q)]
                       for qid, r, q in zip(qids, ids.tolist(), probs.tolist())}
                self._write(name.replace("vqa_result", f"vqa_top{top_n}"), [
                    {"question_id": qid, "answers": top[qid]} for qid in dataset.question_ids if qid in top])
        if dataset.truth:
            report = accuracy_report(predicted, dataset.truth, dataset.types)
            metrics.update(acc=report["acc"], per_type=report["per_type"])
            logger.info("%s: VQA accuracy %.2f on %d questions; per type: %s", name, report["acc"], report["n"],
                        ", ".join(f"{t} {v['acc']:.1f} (n={v['n']})" for t, v in report["per_type"].items()))
        return metrics

    def _write(self, name: str, rows: list) -> str:
        from engine import task_run

        path = task_run.write_result_file(self.output_dir, f"{name}.json", rows)
        logger.info("wrote %s (%d questions)", path, len(rows))
        return path


def eval_datasets(config: dict) -> dict[str, VQATestDataset]:
    """The configured val / test splits (absent ones are skipped), with their ground truth where given."""
    from dataset import VQATestDataset, build_transform
    from dataset.validate import read_json

    transform = build_transform("test", config["image_res"])
    rules = [tuple(rule) for rule in config["question_types"]]
    splits = {}
    for split in ("val", "test"):
        if config[f"{split}_file"]:
            answers_file = config[f"{split}_answers_file"]
            splits[split] = VQATestDataset(config[f"{split}_file"], transform, config["vqa_root"], config["vg_root"],
                                           config["max_words_test"], read_json(answers_file) if answers_file else None,
                                           rules)
    return splits


def flat_metrics(split: str, metrics: dict) -> dict[str, Any]:
    """The scalar metrics of one split for ``log.txt``: ``val_acc``, ``val_acc_<type>`` ..."""
    out = {f"{split}_{k}": v for k, v in metrics.items() if not isinstance(v, dict)}
    out.update({f"{split}_acc_{name}": v["acc"] for name, v in metrics.get("per_type", {}).items()})
    return out


def run_evaluation(model: ALBEFVQA, args: Any, splits: dict, evaluate: Evaluator, device: torch.device) -> dict:
    """``--evaluate``: the ``--checkpoint`` weights answer val (``vqa_val_result.json``) and test
    (``vqa_result.json``)."""
    from models.checkpoint import load_weights, read_state_dict

    if args.checkpoint:
        state, _ = read_state_dict(args.checkpoint)
        if not any(k.removeprefix("module.").startswith("text_decoder.") for k in state):
            logger.warning("%s has no answer decoder: it is initialised from the fusion layers and the MLM head, "
                           "untrained for VQA; evaluate a fine-tuned checkpoint (vqa.pth)", args.checkpoint)
        load_weights(model, state)
    else:
        logger.warning("--evaluate without --checkpoint: evaluating a randomly initialised model")
    model.to(device)
    results: dict = {"mode": "evaluate", "checkpoint": args.checkpoint}
    for split, dataset in splits.items():
        results[split] = evaluate(model, dataset, "vqa_result" if split == "test" else "vqa_val_result")
    return results


def run_training(model: ALBEFVQA, args: Any, config: dict, splits: dict, evaluate: Evaluator,
                 tokenizer: TextTokenizer, device: torch.device) -> dict:
    """Fine-tune with ``trainer.fit`` (val each epoch when configured), then answer test with the best (or last)
    epoch's weights: ``vqa_result_epoch{E}.json``."""
    from dataset import VQATrainDataset, build_transform, create_loader, vqa_collate
    from engine import distributed, task_run

    transform = build_transform("train", config["image_res"], crop_scale=tuple(config["crop_scale"]),
                                randaug=config["randaug"])
    train_set = VQATrainDataset(config["train_file"], transform, config["vqa_root"], config["vg_root"],
                                config["eos"], config["max_words"], evaluate.answer_list)
    logger.info("%d training questions", len(train_set))
    loader = create_loader(train_set, config["batch_size_train"], config["num_workers"], shuffle=True, seed=args.seed,
                           drop_last=True, rank=distributed.get_rank(), world_size=distributed.get_world_size(),
                           collate_fn=vqa_collate)

    def evaluate_split(m: torch.nn.Module, split: str, epoch: int | None) -> dict:
        return evaluate(m, splits[split], f"vqa{'_val' if split == 'val' else ''}_result_epoch{epoch}")

    step = make_step_fn(tokenizer, config, device, evaluate.max_tokens)
    results = task_run.fit_and_test(model, loader, step, config, args, device, splits, evaluate_split, "acc",
                                    flat_metrics)
    return {**results, "out_of_list_answers": train_set.out_of_list}


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and/or answer; returns the results written to ``result/vqa_metrics.json``."""
    args = get_parser(__doc__).parse_args(argv)
    from dataset import load_answer_list
    from engine import checks, distributed, task_run, trainer
    from models.albef import ALBEFConfig
    from models.model_vqa import ALBEFVQA
    from models.tokenizer import TextTokenizer

    config, device = trainer.setup_run(args, DEFAULTS, CONFIG_CHECKS)  # checked before anything is written
    if not args.evaluate:
        checks.check_files_given(config, ["train_file"], args.config)
    tokenizer = TextTokenizer(args.text_encoder)
    model_config = ALBEFConfig.from_config(config)
    model = ALBEFVQA(model_config, decoder_layers=config["decoder_layers"] or None,
                     pad_token_id=tokenizer.pad_token_id)
    evaluate = Evaluator(config, tokenizer, load_answer_list(config["answer_list"]), device, args.output_dir,
                         max_tokens=model_config.bert.max_position_embeddings)
    splits = eval_datasets(config)
    if args.evaluate:
        results = run_evaluation(model, args, splits, evaluate, device)
    else:
        results = run_training(model, args, config, splits, evaluate, tokenizer, device)
    task_run.write_results(args.output_dir, results, "vqa", flat_metrics)
    distributed.barrier()
    return results


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
