"""VQA accuracy with the answer normalisation of the standard VQA evaluation (``vqaEval.py`` of the VQA v2
evaluation tools), and per-type summaries.

For a question with annotator answers ``gt`` (10 in VQA v2) and a predicted answer ``res``:

- ``res`` is normalised: newlines/tabs to spaces, stripped, punctuation (:func:`process_punctuation`), then
  lower-cased words with number words mapped to digits, articles dropped and contractions restored
  (:func:`process_digit_article`);
- when the annotators disagree (more than one distinct answer), each ``gt`` answer goes through
  :func:`process_punctuation` (only that, as the standard tool);
- accuracy = mean over the ``len(gt)`` leave-one-out subsets of ``min(#matches in the subset / 3, 1)``.

A single ground-truth string (the toy world's ``vqa_test_answers.json``) has no leave-one-out subset; it
scores 1 when both answers are equal after the full normalisation, else 0 (exact match).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The standard tool's expressions, kept as they are (the first one's look-behind is mistyped there).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# word -> restored contraction; "somebody'd" -> "somebodyd" is in the standard table too.
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're
youve:you've""".split())


def process_punctuation(text: str) -> str:
    """Delete (when it touches a space, or the text has a digit,digit) or space out each punctuation mark; drop
    periods not followed by a digit (the standard tool, including its ``count=re.UNICODE`` = 32 replacements)."""
    out = text
    glued = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """Lower-case words; number words -> digits; drop articles; restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The full normalisation the standard tool applies to a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, ground_truth: str | Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer (see the module docstring for the rule)."""
    res = normalize_answer(prediction)
    if isinstance(ground_truth, str):
        return float(res == normalize_answer(ground_truth))
    gts = list(ground_truth)
    if not gts:
        raise ValueError("empty list of ground-truth answers")
    if len(gts) == 1:
        return float(res == normalize_answer(gts[0]))
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    matches = [g == res for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def accuracy_report(
    predictions: Mapping[int, str], truth: Mapping[int, str | Sequence[str]],
    types: Mapping[int, Iterable[str]] | None = None,
) -> dict:
    """VQA accuracy (percent) over the questions of ``truth``; a question without prediction scores 0.

    predictions, truth: question id -> answer / ground truth; types: question id -> the types it belongs to
    (a question may have several, e.g. ``color`` and ``relation``). Returns ``{'acc', 'n', 'unanswered',
    'per_type': {type: {'acc', 'n'}}}``.
    """
    scores = {qid: vqa_accuracy(predictions[qid], gt) if qid in predictions else 0.0 for qid, gt in truth.items()}
    per_type: dict[str, list[float]] = defaultdict(list)
    for qid, score in scores.items():
        for name in (types or {}).get(qid, ()):
            per_type[name].append(score)
    n = len(scores)
    return {
        "acc": 100.0 * sum(scores.values()) / max(n, 1), "n": n,
        "unanswered": sum(qid not in predictions for qid in truth),
        "per_type": {name: {"acc": 100.0 * sum(v) / len(v), "n": len(v)} for name, v in sorted(per_type.items())},
    }


def question_types(question: str, rules: Sequence[tuple[str, str]]) -> list[str]:
    """The names of every ``(name, regex)`` rule whose regex matches the question (``re.search``)."""
    return [name for name, pattern in rules if re.search(pattern, question)]
