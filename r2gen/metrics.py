"""Report-quality metrics: pycocoevalcap NLG scores as R2Gen computes them, and clinical efficacy.

NLG: R2Gen's ``compute_scores`` scores ``{i: [text]}`` dicts with one reference per study, on the
cleaned lowercase text as it is (no PTB tokenizer): BLEU-1..4 (corpus level, option 'closest'),
METEOR 1.5 and ROUGE-L; we add pycocoevalcap's CIDEr, which R2Gen does not report. METEOR runs the
jar shipped with pycocoevalcap in a Java subprocess; without Java (or when it fails) METEOR is None
with a one-line reason, never a crash and never a made-up number.

Clinical efficacy (CE): both texts are labelled with our rule-based labeler for the 14 CheXpert
observations, and micro precision/recall/F1 of the positive labels are computed as in the later
R2Gen repository's ``compute_ce.py`` (blank -> 0, uncertain -> 0, so only positives count).

The labeler finds mention phrases in each sentence and decides each mention's polarity from cues
in its clause: the nearest preceding cue ("no", "without", "free of", "possible", "may represent",
"cannot exclude", ...) or, failing one, a following cue ("... has resolved", "... cannot be
excluded"). Organ phrases ("heart size", "cardiac silhouette", "costophrenic angles",
"mediastinal contours") count only with a qualifier: "enlarged"/"widened"/"blunted" is positive,
"normal"/"within normal limits"/"sharp" negative, "borderline" uncertain. It works on raw reports
and on R2Gen-cleaned text (lowercase, punctuation removed, periods as separate tokens).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pycocoevalcap.meteor.meteor
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

NLG_KEYS: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

# CheXpert's 14 observations, in CheXpert's order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

_METEOR_TIMEOUT_S = 600.0  # a JVM that has not answered by then is stuck, not slow


# --------------------------------------------------------------------------------------------
# NLG metrics
# --------------------------------------------------------------------------------------------


def compute_nlg(references: list[str], hypotheses: list[str], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``hypotheses`` against one reference each.

    Texts are scored as given (R2Gen passes its cleaned lowercase text). Returns a dict with
    ``NLG_KEYS`` (floats; METEOR may be None) and, when METEOR is None, ``METEOR_error``: a one-line
    reason (Java missing, the subprocess failed, or ``meteor=False``).

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no reports to score")
    gts = {i: [text] for i, text in enumerate(references)}
    res = {i: [text] for i, text in enumerate(hypotheses)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores: dict = {f"BLEU_{n + 1}": float(bleu[n]) for n in range(4)}
    scores["METEOR"] = None
    scores["ROUGE_L"] = float(rouge)
    scores["CIDEr"] = float(cider)
    if not meteor:
        scores["METEOR_error"] = "METEOR not computed (meteor=False)"
        return scores
    try:
        scores["METEOR"] = _meteor(references, hypotheses)
    except MeteorUnavailable as exc:
        scores["METEOR_error"] = str(exc)
    return scores


class MeteorUnavailable(RuntimeError):
    """METEOR could not be computed here; the message says why in one line."""


def _meteor(references: list[str], hypotheses: list[str]) -> float:
    """Corpus METEOR 1.5 exactly as pycocoevalcap's ``Meteor`` asks the jar for it.

    Our own driver of the same protocol: one JVM per call, stderr kept for the error message, the
    locale pinned to English (a German or French JVM prints decimal commas), a watchdog that kills
    a stuck JVM, and the process always closed and reaped.
    """
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable("java not found on PATH; install a Java runtime (e.g. openjdk-17-jre-headless)")
    folder = Path(pycocoevalcap.meteor.meteor.__file__).resolve().parent  # the jar and its data ship there
    jar = folder / "meteor-1.5.jar"
    if not jar.is_file() or not (folder / "data" / "paraphrase-en.gz").is_file():
        raise MeteorUnavailable(f"METEOR files missing in {folder}; reinstall pycocoevalcap")
    command = [java, "-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8", "-Xmx2G",
               "-jar", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]

    with tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(command, cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=stderr, env={**os.environ, "LC_ALL": "C.UTF-8"})
        except OSError as exc:
            raise MeteorUnavailable(f"could not start java: {exc.strerror or exc}") from None
        watchdog = threading.Timer(_METEOR_TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            return _meteor_dialogue(process, references, hypotheses)
        except (OSError, ValueError) as exc:
            stderr.seek(0)
            detail = stderr.read().decode("utf-8", "replace").strip().splitlines()
            why = detail[-1] if detail else f"{type(exc).__name__}: {exc}"
            if not watchdog.is_alive():
                why = f"no answer within {_METEOR_TIMEOUT_S:.0f} s"
            raise MeteorUnavailable(f"METEOR subprocess failed: {why}") from None
        finally:
            watchdog.cancel()
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


def _meteor_dialogue(process: subprocess.Popen, references: list[str], hypotheses: list[str]) -> float:
    """SCORE one line per pair to get its statistics, then EVAL them all: per-pair scores, then the corpus score."""

    def ask(line: str) -> str:
        process.stdin.write((line + "\n").encode("utf-8"))
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
            raise ValueError("the METEOR process closed its output")
        return answer.decode("utf-8").strip()

    def one_line(text: str) -> str:  # the protocol is line- and '|||'-delimited
        return " ".join(text.replace("|||", "").split())

    stats = [ask(f"SCORE ||| {one_line(ref)} ||| {one_line(hyp)}") for ref, hyp in zip(references, hypotheses)]
    process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
    process.stdin.flush()
    for _ in stats:  # per-pair scores, unused (R2Gen keeps only the corpus score)
        if not process.stdout.readline():
            raise ValueError("the METEOR process closed its output")
    score = float(process.stdout.readline().decode("utf-8").strip())
    if not math.isfinite(score):
        raise ValueError(f"METEOR returned {score}")
    return score


# --------------------------------------------------------------------------------------------
# Rule-based CheXpert-style labeler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phrase:
    """A mention pattern: a pathology (positive unless a cue says otherwise) or an organ (needs a qualifier)."""

    pattern: str
    labels: tuple[str, ...]  # labels it sets when positive or uncertain
    organ: bool
    negative_labels: tuple[str, ...]  # labels it sets to 0 when negated or normal


def _pathology(pattern: str, *labels: str) -> _Phrase:
    return _Phrase(pattern, labels, organ=False, negative_labels=labels)


def _organ(pattern: str, *labels: str, negative: tuple[str, ...] = ()) -> _Phrase:
    return _Phrase(pattern, labels, organ=True, negative_labels=negative or labels)


_PHRASES: tuple[_Phrase, ...] = (
    _pathology(r"cardiomegaly|cardiac enlargement|enlarged heart|enlargement of the (heart|cardiac silhouette)",
               "Cardiomegaly"),
    _organ(r"heart size|size of the heart|cardiac size|heart|cardiac (silhouette|shadow|contours?)", "Cardiomegaly"),
    # a normal cardiomediastinal silhouette says the heart is normal too; an enlarged one is not cardiomegaly
    _organ(r"cardiomediastinal (silhouette|contours?|structures|shadow)|cardiomediastinum",
           "Enlarged Cardiomediastinum", negative=("Enlarged Cardiomediastinum", "Cardiomegaly")),
    _pathology(r"(widened|widening of the) mediastinum|mediastinal (widening|enlargement)",
               "Enlarged Cardiomediastinum"),
    _organ(r"mediastinal (contours?|silhouette|configuration|structures)|mediastinum", "Enlarged Cardiomediastinum"),
    _pathology(r"nodules?|nodular (density|densities|opacity|opacities)|masse?s?|granulomas?|granulomata|"
               r"(pulmonary|lung|cavitary|parenchymal) lesions?|tumou?r|neoplasm|carcinoma", "Lung Lesion"),
    _pathology(r"opacit(y|ies)|opacification|opacified|infiltrates?|infiltration|air ?space (disease|opacit(y|ies))|"
               r"increased density|haziness", "Lung Opacity"),
    _pathology(r"(pulmonary |interstitial |alveolar )?edema|(pulmonary |vascular )congestion|"
               r"(congestive )?heart failure|chf", "Edema"),
    _pathology(r"consolidat\w*", "Consolidation"),
    _pathology(r"(broncho)?pneumonias?|infection|infectious( process)?", "Pneumonia"),
    _pathology(r"atelecta\w*|(lobar )?collapse|volume loss", "Atelectasis"),
    _pathology(r"pneumothora(x|ces|xes)", "Pneumothorax"),
    _pathology(r"(pleural )?effusions?|pleural fluid|hydrothorax", "Pleural Effusion"),
    _organ(r"costophrenic (angles?|sulcus|sulci|recess(es)?)", "Pleural Effusion"),
    _pathology(r"pleural (thickening|scar(ring)?|plaques?|calcifications?)|fibrothorax", "Pleural Other"),
    _pathology(r"fractures?|fractured", "Fracture"),
    _pathology(r"pacemaker|pacer|defibrillator|icd|(central|venous|arterial|picc) (line|catheter)|picc|catheters?|"
               r"(endotracheal|tracheostomy|nasogastric|orogastric|feeding|chest|et|ng|og) tubes?|"
               r"sternotomy( wires)?|surgical clips|(mediport|port a cath)|stents?|support devices?|"
               r"prosthe(sis|tic valve)|valve replacement", "Support Devices"),
)

# Cues, as word-bounded regexes on normalised text. Uncertainty is matched first so that "cannot
# exclude" and "not excluded" are not read as negations; pseudo-negations ("no change in") are
# matched and ignored.
_UNCERTAIN_BEFORE = (r"(cannot|can not|cant) (be )?(excluded?|ruled? out)|not (be )?(excluded|ruled out)|"
                     r"(may|might|could) (represent|reflect|be|indicate)|may|might|possibl[ey]|probabl[ey]|likely|"
                     r"questionabl[ey]|question of|suspicious for|suspect(ed)?|concerning for|concern for|"
                     r"suggestive of|suggest(s|ing)?|worrisome for|borderline|equivocal|indeterminate|versus|vs|"
                     r"differential|rule out")
_UNCERTAIN_AFTER = (r"(cannot|can not|cant) be (excluded|ruled out)|(is|are) not (excluded|ruled out)|"
                    r"not (excluded|ruled out)|(is|are) (also )?(possible|suspected|questioned|likely)|versus|vs")
_PSEUDO_NEGATION = r"no (significant |interval )?change|without (significant |interval )?change|not only|no increase"
_NEGATION_BEFORE = (r"no evidence of|no signs? of|without evidence of|negative for|free of|clear of|absence of|"
                    r"resolution of|resolved|no|not|without|never|denies")
_NEGATION_AFTER = (r"(has|have)? ?(resolved|cleared)|(is|are|was|were)? ?(not|no longer) "
                   r"(seen|identified|present|appreciated|visualized|demonstrated|evident|visible)|(is|are) absent")

# Organ qualifiers, claimed in this order where they overlap ("top normal" before "normal",
# "not enlarged" before "enlarged"); the one nearest to the organ phrase decides.
_QUALIFIERS = (
    (-1, r"borderline( enlarged| prominent| size)?|top normal|(top|high|upper limits?) (of )?normal|equivocal"),
    (0, r"within normal limits|normal( in size)?|unremarkable|not (significantly )?(enlarged|widened|blunted)|"
        r"no (evidence of )?enlargement|sharp|clear|preserved"),
    (1, r"(mildly |moderately |markedly |severely )?(enlarged|enlargement|increased|widened|widening|prominent|"
        r"prominence|large|blunted|blunting|obliterated|obliteration)"),
)
_HEDGED = re.compile(r"\b(likely|possibly|probably|questionably|possible|probable|suspected|(may|might|could) be)"
                     r"\s+(\w+\s+)?$")

# Scope: sentences end at periods (not decimal points), semicolons, colons, '?', '!' and newlines
# between paragraphs; clauses end at contrastive words, "which" and a new "there is/are".
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[;:?!]|\n\s*\n")
_CLAUSE_BREAK = re.compile(r"\b(but|however|although|though|except|whereas|while|aside from|apart from|which|"
                           r"there (is|are|has been|have been))\b")


def _compile(alternatives: str) -> re.Pattern:
    return re.compile(rf"\b({alternatives})\b")


_PHRASE_RES = tuple((_compile(p.pattern), p) for p in _PHRASES)
_CUE_RES = {
    "uncertain_before": _compile(_UNCERTAIN_BEFORE),
    "uncertain_after": _compile(_UNCERTAIN_AFTER),
    "pseudo": _compile(_PSEUDO_NEGATION),
    "negation_before": _compile(_NEGATION_BEFORE),
    "negation_after": _compile(_NEGATION_AFTER),
}
_QUALIFIER_RES = tuple((polarity, _compile(pattern)) for polarity, pattern in _QUALIFIERS)
_CONJUNCTION_ONLY = re.compile(r"^(\s|,|and|or|the|its)*$")


def _normalise(text: str) -> str:
    """Lowercase; hyphens and slashes between words become spaces; de-identification tokens go."""
    text = text.lower().replace("xxxx", " ")
    text = re.sub(r"(?<=[a-z])[-/](?=[a-z])", " ", text)
    text = re.sub(r"[\"'`()\[\]{}*]", "", text)
    return re.sub(r"[ \t]+", " ", text)


def _clauses(text: str) -> list[str]:
    """Split normalised text into sentences, then into clauses at scope-breaking words."""
    clauses = []
    for sentence in _SENTENCE_END.split(text.replace("\r", "")):
        sentence = " ".join(sentence.split())
        starts = [0] + [m.start() for m in _CLAUSE_BREAK.finditer(sentence) if m.start() > 0] + [len(sentence)]
        clauses += [sentence[a:b].strip(" ,") for a, b in zip(starts, starts[1:]) if sentence[a:b].strip(" ,")]
    return clauses


def _mentions(clause: str) -> list[tuple[int, int, _Phrase]]:
    """Non-overlapping phrase matches, the longest first where two overlap, in text order."""
    found = [(m.start(), m.end(), phrase) for regex, phrase in _PHRASE_RES for m in regex.finditer(clause)]
    found.sort(key=lambda item: (item[0] - item[1], item[0]))  # longest first
    kept: list[tuple[int, int, _Phrase]] = []
    for start, end, phrase in found:
        if all(end <= a or start >= b for a, b, _ in kept):
            kept.append((start, end, phrase))
    return sorted(kept, key=lambda item: item[0])


def _cues(clause: str) -> list[tuple[int, int, str]]:
    """Cue spans (start, end, kind), uncertainty claimed first, then pseudo-negations, then negations."""
    taken: list[tuple[int, int, str]] = []
    for kind in ("uncertain_after", "uncertain_before", "pseudo", "negation_after", "negation_before"):
        for m in _CUE_RES[kind].finditer(clause):
            if m.end() > m.start() and all(m.end() <= a or m.start() >= b for a, b, _ in taken):
                taken.append((m.start(), m.end(), kind))
    return taken


def _cue_polarity(cues: list[tuple[int, int, str]], start: int, end: int) -> int | None:
    """-1/0 from the nearest cue before the mention, else from the nearest cue after it, else None."""
    before = [c for c in cues if c[1] <= start and c[2] in ("uncertain_before", "negation_before", "pseudo")]
    if before:
        kind = max(before, key=lambda c: c[1])[2]
        return {"uncertain_before": -1, "negation_before": 0, "pseudo": None}[kind]
    after = [c for c in cues if c[0] >= end and c[2] in ("uncertain_after", "negation_after")]
    if after:
        return -1 if min(after, key=lambda c: c[0])[2] == "uncertain_after" else 0
    return None


def _qualifier(before: str, after: str) -> int | None:
    """Polarity of the qualifier nearest to an organ phrase, given the text just before and after it."""
    best: tuple[int, int] | None = None  # (distance, polarity)
    for text, is_after in ((before, False), (after, True)):
        taken: list[tuple[int, int, int]] = []
        for polarity, regex in _QUALIFIER_RES:
            for m in regex.finditer(text):
                if all(m.end() <= a or m.start() >= b for a, b, _ in taken):
                    taken.append((m.start(), m.end(), polarity))
        for start, end, polarity in taken:
            distance = start if is_after else len(text) - end
            if _HEDGED.search(text[:start]):
                polarity = -1
            if best is None or distance < best[0]:
                best = (distance, polarity)
    return None if best is None else best[1]


def _label_clause(clause: str, labels: dict[str, list[int]]) -> None:
    """Append the polarity of every mention in ``clause`` to ``labels[observation]``."""
    mentions = _mentions(clause)
    cues = _cues(clause)
    organ_results: list[int | None] = [None] * len(mentions)
    # Organs are decided from the last to the first so that "heart size and mediastinal contours
    # are normal" lets the heart share the contours' qualifier.
    for i in range(len(mentions) - 1, -1, -1):
        start, end, phrase = mentions[i]
        if not phrase.organ:
            continue
        left = mentions[i - 1][1] if i > 0 else 0
        right = mentions[i + 1][0] if i + 1 < len(mentions) else len(clause)
        polarity = _qualifier(clause[left:start], clause[end:right])
        if polarity is None and i + 1 < len(mentions) and mentions[i + 1][2].organ \
                and _CONJUNCTION_ONLY.match(clause[end:right]):
            polarity = organ_results[i + 1]
        organ_results[i] = polarity
    for (start, end, phrase), organ_polarity in zip(mentions, organ_results):
        if phrase.organ:
            if organ_polarity is None:
                continue
            polarity = organ_polarity
        else:
            cue = _cue_polarity(cues, start, end)
            polarity = 1 if cue is None else cue
        for label in (phrase.negative_labels if polarity == 0 else phrase.labels):
            labels.setdefault(label, []).append(polarity)


def label_report(text: str) -> dict[str, int | None]:
    """CheXpert-style labels of one report: 1 positive, 0 negative, -1 uncertain, None not mentioned.

    Several mentions of one observation combine as CheXpert does: positive beats uncertain beats
    negative. "No Finding" is 1 when no observation other than Support Devices is positive or
    uncertain, else None.
    """
    found: dict[str, list[int]] = {}
    for clause in _clauses(_normalise(text)):
        _label_clause(clause, found)
    result: dict[str, int | None] = {}
    for label in CHEXPERT_LABELS:
        values = found.get(label)
        result[label] = None if not values else (1 if 1 in values else (-1 if -1 in values else 0))
    observations = [label for label in CHEXPERT_LABELS if label not in ("No Finding", "Support Devices")]
    result["No Finding"] = None if any(result[label] in (1, -1) for label in observations) else 1
    return result


def findings_to_chexpert(findings: dict) -> dict[str, int | None]:
    """CheXpert labels of a synthetic study's ground truth (``r2gen.data.synthetic`` findings).

    A synthetic chest has exactly what was drawn, so every observation is 1 or 0: cardiomegaly ->
    Cardiomegaly, effusion -> Pleural Effusion, consolidation -> Consolidation, nodule (calcified
    granuloma) -> Lung Lesion, pneumothorax -> Pneumothorax; No Finding is 1 for a normal study.
    """
    drawn = {
        "Cardiomegaly": bool(findings.get("cardiomegaly")),
        "Pleural Effusion": bool(findings.get("effusion")),
        "Consolidation": bool(findings.get("consolidation")),
        "Lung Lesion": bool(findings.get("nodule")),
        "Pneumothorax": bool(findings.get("pneumothorax")),
    }
    labels: dict[str, int | None] = {label: int(drawn.get(label, False)) for label in CHEXPERT_LABELS}
    labels["No Finding"] = int(not any(drawn.values()))
    return labels


def clinical_efficacy(references: list[str], hypotheses: list[str]) -> dict:
    """Micro precision/recall/F1 of the positive CheXpert labels of ``hypotheses`` against ``references``.

    Both sides are labelled with :func:`label_report`; blank and uncertain count as negative (as
    R2Gen's ``compute_ce.py`` does: NaN -> 0, -1 -> 0). A ratio with a zero denominator is 0.

    Returns:
        ``{"CE_precision", "CE_recall", "CE_F1", "CE_per_label": {label: {"precision", "recall",
        "f1", "support"}}}``; support is the number of positive references.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no reports to score")
    counts = {label: [0, 0, 0] for label in CHEXPERT_LABELS}  # true positives, false positives, false negatives
    for reference, hypothesis in zip(references, hypotheses):
        truth, guess = label_report(reference), label_report(hypothesis)
        for label in CHEXPERT_LABELS:
            t, g = truth[label] == 1, guess[label] == 1
            counts[label][0] += t and g
            counts[label][1] += g and not t
            counts[label][2] += t and not g
    per_label = {label: {**_prf(*c), "support": c[0] + c[2]} for label, c in counts.items()}
    total = [sum(c[k] for c in counts.values()) for k in range(3)]
    micro = _prf(*total)
    return {"CE_precision": micro["precision"], "CE_recall": micro["recall"], "CE_F1": micro["f1"],
            "CE_per_label": per_label}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
